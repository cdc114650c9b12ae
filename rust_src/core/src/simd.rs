//! Runtime instruction-set dispatch for the hot loops.
//!
//! Kernels are written as plain scalar loops over slices in `#[inline(always)]` functions; `multiversion!`
//! wraps one in a function that calls a copy compiled for AVX-512 or AVX2 when the CPU has them, so LLVM
//! auto-vectorizes the loop for the CPU at hand while one abi3 wheel still runs on any x86-64 (and on other
//! architectures, through the portable copy). Closures handed to a `#[target_feature]` function were not
//! reliably vectorized, hence the macro.
//!
//! The environment variable `VRAMKIT_SIMD` (`portable`, `avx2`, `avx512`) caps the level, read once; the
//! tests use it to check that every copy gives the same bits.

use std::sync::OnceLock;

/// The instruction sets the kernels are compiled for, from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2+fma+f16c",
            Self::Avx512 => "avx512",
        }
    }
}

/// The level this process uses: the best the CPU supports, capped by `VRAMKIT_SIMD`.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("VRAMKIT_SIMD").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        let avx512 = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq");
        if avx2 && avx512 {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// `multiversion!(pub fn name<T: Bound>(a: A, b: B) -> R => inner);` defines `name`, which calls the
/// `#[inline(always)]` function `inner` compiled for the best `Level` available, else as is.
macro_rules! multiversion {
    ($vis:vis fn $name:ident $(<$($g:ident : $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $inner:path) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx512 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: each copy differs from `inner` only in the target features it is compiled
                    // for, and `level()` returns a level only after detecting those features on this CPU.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Portable => {}
                }
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

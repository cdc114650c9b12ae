//! Runtime instruction-set dispatch for the hot loops.
//!
//! Kernels are written as plain scalar loops over slices in `#[inline(always)]` functions; `multiversion!`
//! wraps one in a function that calls a copy compiled with AVX2/FMA/F16C when the CPU has them, so LLVM
//! auto-vectorizes the loop for the CPU at hand while one abi3 wheel still runs on any x86-64 (and on
//! other architectures, through the portable copy).

/// True when this CPU runs the AVX2 copies of the kernels.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The vector instruction set the kernels use on this CPU (reported by `vramkit bench`).
pub fn best_isa() -> &'static str {
    if has_avx2() {
        "avx2+fma+f16c"
    } else {
        "portable"
    }
}

/// `multiversion!(pub fn name<T: Bound>(a: A, b: B) -> R => inner);` defines `name`, which calls the
/// `#[inline(always)]` function `inner` compiled for AVX2+FMA+F16C when the CPU has them, else as is.
macro_rules! multiversion {
    ($vis:vis fn $name:ident $(<$($g:ident : $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $inner:path) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: `avx2` only differs from `inner` in being compiled for AVX2, FMA and F16C,
                    // which `has_avx2` has just detected on this CPU.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

//! The kernel's working memory, counted.
//!
//! Every buffer the attention kernel allocates (packed K/V, per-thread blocks) is a `Tracked` vector that
//! adds its bytes to a `Meter` while it lives. The meter keeps the high-water mark, which the kernel
//! reports: that is how the tests check the planner's predicted peak against what was really allocated
//! (Python's tracemalloc cannot see Rust allocations). Nothing else in the kernel allocates, apart from
//! small fixed-size bookkeeping (a few words per thread), which the planner's margin covers.

use crate::error::CoreResult;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes currently allocated through it, and the most ever at once.
#[derive(Debug, Default)]
pub struct Meter {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl Meter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The high-water mark in bytes.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.current.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// A zero-filled vector of `n` elements counted by this meter until it is dropped, or an error
    /// (instead of the process abort of an infallible allocation) when the memory is not there.
    pub fn zeroed<T: bytemuck::Zeroable>(&self, n: usize) -> CoreResult<Tracked<'_, T>> {
        let v = crate::alloc::try_zeroed_vec::<T>(
            n,
            "attention working memory (use smaller blocks or budget)",
        )?;
        let bytes = std::mem::size_of_val(v.as_slice());
        self.add(bytes);
        Ok(Tracked {
            v,
            bytes,
            meter: self,
        })
    }
}

/// A vector whose bytes count on a `Meter` while it lives.
pub struct Tracked<'m, T> {
    v: Vec<T>,
    bytes: usize,
    meter: &'m Meter,
}

impl<T> Drop for Tracked<'_, T> {
    fn drop(&mut self) {
        self.meter.sub(self.bytes);
    }
}

impl<T> std::ops::Deref for Tracked<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v
    }
}

impl<T> std::ops::DerefMut for Tracked<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_keeps_the_high_water_mark() {
        let m = Meter::new();
        {
            let _a = m.zeroed::<f32>(100).unwrap();
            let _b = m.zeroed::<u16>(10).unwrap();
            assert_eq!(m.peak(), 420);
        }
        let _c = m.zeroed::<u8>(50).unwrap();
        assert_eq!(m.peak(), 420);
        assert_eq!(m.current.load(Ordering::Relaxed), 50);
        assert!(m.zeroed::<u8>(0).unwrap().is_empty());
    }

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        let m = Meter::new();
        assert!(m.zeroed::<f32>(usize::MAX / 2).is_err());
        assert!(m.zeroed::<u8>(1 << 62).is_err());
        assert_eq!(m.peak(), 0);
    }
}

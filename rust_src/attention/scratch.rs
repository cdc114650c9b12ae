//! The kernel's working memory, counted.
//!
//! Every buffer the attention kernel allocates (packed K/V, per-thread blocks) is a `Tracked` vector that
//! adds its bytes to a `Meter` while it lives. The meter keeps the high-water mark, which the kernel
//! reports: that is how the tests check the planner's predicted peak against what was really allocated
//! (Python's tracemalloc cannot see Rust allocations). Nothing else in the kernel allocates, apart from
//! small fixed-size bookkeeping (a few words per thread), which the planner's margin covers.

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

    /// A zero-filled vector of `n` elements counted by this meter until it is dropped.
    pub fn zeroed<T: bytemuck::Zeroable>(&self, n: usize) -> Tracked<'_, T> {
        let v: Vec<T> = crate::alloc::zeroed_vec(n);
        let bytes = std::mem::size_of_val(v.as_slice());
        self.add(bytes);
        Tracked {
            v,
            bytes,
            meter: self,
        }
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
            let _a = m.zeroed::<f32>(100);
            let _b = m.zeroed::<u16>(10);
            assert_eq!(m.peak(), 420);
        }
        let _c = m.zeroed::<u8>(50);
        assert_eq!(m.peak(), 420);
        assert_eq!(m.current.load(Ordering::Relaxed), 50);
    }
}

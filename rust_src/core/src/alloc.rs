//! Output buffers for the kernels.
//!
//! Large outputs are fresh memory, and on Linux a fresh 4 KiB page costs a fault that, on the VMs our
//! users and CI run on, is slower than the kernel's whole work on that page (a plain `clone()` of 256 MB
//! measured 3.8 GB/s here against 34 GB/s with huge pages). So big buffers ask for transparent huge
//! pages before they are first touched (one fault per 2 MiB instead of 512), and `populate` maps them in
//! with one system call before the threads write: two threads faulting the same mapping at once measured
//! slower here than one thread doing it alone (a 256 MB copy: 14-18 GB/s against 21-23 GB/s).

use crate::error::{CoreError, CoreResult};

/// Buffers smaller than this stay on ordinary pages (they come from malloc's heap anyway).
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;

/// A zero-filled vector of `n` elements, or an error (not the process abort of an infallible allocation)
/// when the memory is not there; `what` names the buffer in that error. The zeros come from
/// `calloc`/fresh mappings, so they cost no pass over memory; large vectors are advised to use huge pages
/// before any page is touched.
pub fn try_zeroed_vec<T: bytemuck::Zeroable>(n: usize, what: &str) -> CoreResult<Vec<T>> {
    let out_of_memory = || {
        CoreError::OutOfMemory(format!(
            "{what}: {n} elements of {} bytes could not be allocated",
            std::mem::size_of::<T>()
        ))
    };
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| out_of_memory())?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size (checked above), as `alloc_zeroed` requires.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(out_of_memory());
    }
    if layout.size() >= HUGE_PAGE_MIN_BYTES {
        advise_huge_pages(ptr.cast(), layout.size());
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[T; n]` (size and alignment
    // match what `Vec<T>` with capacity `n` deallocates), and all `n` elements are initialized: they are
    // zero bytes, a valid `T` because `T: Zeroable`.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *const u8, len: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside the allocation `ptr..ptr + len` that the caller owns.
        // MADV_HUGEPAGE only changes how the kernel backs these pages, never what they contain, so no
        // memory visible to Rust changes; a failure (e.g. THP disabled) leaves ordinary pages, which is fine.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *const u8, _len: usize) {}

/// Maps in (and zero-fills) every page of a large buffer that nothing has touched yet, in one call made by
/// this thread, so that the parallel kernel that fills it next does not take page faults. Small buffers,
/// other systems and kernels older than Linux 5.14 (which refuse the call) simply fault on first touch.
pub fn populate<T>(buf: &mut [T]) {
    let bytes = std::mem::size_of_val(buf);
    if bytes >= HUGE_PAGE_MIN_BYTES {
        populate_pages(buf.as_mut_ptr().cast(), bytes);
    }
}

#[cfg(target_os = "linux")]
fn populate_pages(ptr: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside `buf`, to which the caller holds a `&mut`. MADV_POPULATE_WRITE
        // only pre-faults those pages as writable; it changes no byte the program can observe (a fresh page
        // is zero whether mapped now or at first touch, and mapped pages keep their contents). Errors (old
        // kernels) are ignored: the pages are then faulted in by the writes, as without this call.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn populate_pages(_ptr: *mut u8, _len: usize) {}

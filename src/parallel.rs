//! What the fused CPU loops share: libtorch's intra-op thread pool
//! ([`parallel_for`], through the C++ shim), the work per task and a pointer that
//! tasks writing disjoint ranges can share.

pub use crate::ffi::parallel_for;

/// Elements per task: below this a loop runs on the calling thread.
pub const GRAIN: usize = 1 << 15;

/// A raw pointer that tasks share; each task touches a disjoint range.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: users write disjoint index ranges only (see each call site).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Pointer to element `i` (a method, so closures capture the Sync wrapper).
    ///
    /// # Safety
    /// `i` must be in bounds of the allocation.
    #[inline]
    pub unsafe fn at(&self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

/// Calls `f(sample, lo, hi)` for the parts of the flat range `[begin, end)` that fall in
/// each sample of `per` elements.
#[inline]
pub fn segments(begin: usize, end: usize, per: usize, mut f: impl FnMut(usize, usize, usize)) {
    let mut i = begin;
    while i < end {
        let sample = i / per;
        let hi = end.min((sample + 1) * per);
        f(sample, i, hi);
        i = hi;
    }
}

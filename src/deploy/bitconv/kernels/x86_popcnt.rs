//! The portable kernel compiled for the x86-64 `popcnt` instruction.

use super::portable::dot_generic;

#[target_feature(enable = "popcnt")]
pub unsafe fn dot_popcnt(
    a: &[u64],
    starts: &[usize],
    row_len: usize,
    w: &[u64],
    blocks: usize,
    acc: &mut [u32],
) {
    dot_generic(a, starts, row_len, w, blocks, acc)
}

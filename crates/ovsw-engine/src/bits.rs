//! The bit layout of packed channels, defined here once.
//!
//! A run of `C` channels (one pixel of one group, or one tap of one output channel's
//! weight) takes `ceil(C / 64)` `u64` words: channel `c` is bit `c % 64` of word
//! `c / 64`, set where the channel's sign is -1; the bits past the last channel are 0.
//! Non-zero masks use the same layout, set where the value is not zero.
//!
//! Binary weights are packed with it at export ([`super::lower`]) and activations by
//! the engine ([`super::bitconv`]), whose SIMD packers are tested against
//! [`pack_channels`].

/// Channels per `u64` word.
pub const BITS: usize = 64;

/// The words a run of `channels` channels takes.
pub fn words_for(channels: usize) -> usize {
    channels.div_ceil(BITS)
}

/// Packs `values` into `out`, `words_for(values.len())` words: bit `c % 64` of word
/// `c / 64` is set where `set(values[c])`; bits past the channels are 0.
///
/// Panics when `out` has the wrong length (a bug in the caller).
#[inline(always)]
pub fn pack_channels<T: Copy>(values: &[T], out: &mut [u64], mut set: impl FnMut(T) -> bool) {
    assert_eq!(
        out.len(),
        words_for(values.len()),
        "packed words for {} channels",
        values.len()
    );
    for (part, word) in values.chunks(BITS).zip(out.iter_mut()) {
        let mut bits = 0u64;
        for (b, &v) in part.iter().enumerate() {
            bits |= u64::from(set(v)) << b;
        }
        *word = bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_c_is_bit_c_mod_64_of_word_c_div_64() {
        for len in [1, 5, 63, 64, 65, 127, 128, 130, 200] {
            let set: Vec<bool> = (0..len).map(|c| (c * 7 + c / 3) % 5 < 2).collect();
            let mut out = vec![u64::MAX; words_for(len)];
            pack_channels(&set, &mut out, |s| s);
            assert_eq!(out.len(), len.div_ceil(64));
            for (w, &word) in out.iter().enumerate() {
                for b in 0..64 {
                    let c = w * 64 + b;
                    let want = c < len && set[c];
                    assert_eq!((word >> b) & 1 == 1, want, "{len} channels: channel {c}");
                }
            }
        }
    }

    #[test]
    fn words_for_rounds_up() {
        assert_eq!(
            [0, 1, 63, 64, 65, 128, 129].map(words_for),
            [0, 1, 1, 1, 2, 2, 3]
        );
    }
}

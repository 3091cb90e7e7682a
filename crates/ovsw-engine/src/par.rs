//! How the engine shares work between its threads.
//!
//! Two ways, chosen per call by [`crate::engine::Engine::run`]:
//!
//! - **Across the batch.** A batch of several images is cut into sub-batches, and each
//!   thread runs whole sub-batches through the network on its own ([`Serial`] is held
//!   meanwhile, so no op splits). A sub-batch is also kept small enough for its
//!   activations to stay in cache ([`sub_batch`]), so a batch of 64 costs what 8
//!   batches of 8 cost.
//! - **Inside each op.** One image (or too few to go round) is run op by op, each op
//!   splitting its rows over the pool, but only into tasks of at least [`MIN_TASK`]
//!   units of work ([`min_len`]): waking a thread costs more than a small op's share.
//!
//! Neither changes a value: every op computes each output element from the same inputs
//! in the same order whatever the split, so one image's logits do not depend on the
//! batch it is in or on the thread count (`tests/deploy/`).

use std::cell::Cell;

/// The least work per parallel task, in units of about one multiply-add or one 64-bit
/// XOR-popcount per output channel (roughly 10 to 50 microseconds of work).
pub const MIN_TASK: usize = 1 << 17;

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// While alive, ops on this thread do not split their work (the thread runs a
/// sub-batch of its own).
pub struct Serial {
    was: bool,
}

impl Serial {
    pub fn enter() -> Serial {
        Serial {
            was: SERIAL.replace(true),
        }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        SERIAL.set(self.was);
    }
}

/// The fewest items per parallel task for items of `work` units each (rayon's
/// `with_min_len`): `usize::MAX`, one task, under [`Serial`] or on a one-thread pool.
pub fn min_len(work: usize) -> usize {
    if SERIAL.get() || rayon::current_num_threads() == 1 {
        usize::MAX
    } else {
        MIN_TASK.div_ceil(work.max(1))
    }
}

/// Activation bytes a sub-batch may hold in its largest value: about a core's L2
/// cache (512 KiB on Zen 3, 1 MiB on Zen 5, 1 to 2 MiB on recent Xeons). On a Zen 5
/// (`python -m ovsw.deploy bench`'s networks, batches 8 and 64, 1 and 2 threads) 0.5,
/// 1, 2 and 4 MiB gave the same images/s within noise.
pub const SUB_BATCH_BYTES: usize = 1 << 20;

/// Images per sub-batch for a batch of `n` on `threads` threads, when the largest
/// activation of one image takes `peak_bytes`: at most what [`SUB_BATCH_BYTES`] holds
/// (one image at least, however large), and at most `n / threads` rounded up, so that
/// the sub-batches go round the threads. `n` itself (no cutting) for one image, or, on
/// several threads, for fewer than two images per thread, which the ops share better
/// by splitting rows.
pub fn sub_batch(n: usize, threads: usize, peak_bytes: usize) -> usize {
    let threads = threads.max(1);
    if n < 2 || (threads > 1 && n < 2 * threads) {
        return n;
    }
    let fits = (SUB_BATCH_BYTES / peak_bytes.max(1)).max(1);
    fits.min(n.div_ceil(threads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_batches_fit_the_cache_and_go_round_the_threads() {
        let mb = 1 << 20;
        // One image, or too few per thread: not cut.
        assert_eq!(sub_batch(1, 1, mb), 1);
        assert_eq!(sub_batch(1, 2, mb), 1);
        assert_eq!(sub_batch(3, 2, mb), 3);
        // 256 KiB per image: 4 per sub-batch.
        assert_eq!(sub_batch(64, 1, mb / 4), 4);
        assert_eq!(sub_batch(64, 2, mb / 4), 4);
        assert_eq!(sub_batch(64, 2, mb), 1);
        // Small images: as many as go round the threads.
        assert_eq!(sub_batch(64, 2, 1024), 32);
        assert_eq!(sub_batch(8, 1, 1024), 8);
        // An image larger than the budget: one at a time.
        assert_eq!(sub_batch(8, 2, 64 * mb), 1);
    }

    #[test]
    fn serial_stops_splitting_until_dropped() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(min_len(MIN_TASK / 4), 4);
            assert_eq!(min_len(usize::MAX), 1);
            {
                let _s = Serial::enter();
                assert_eq!(min_len(MIN_TASK), usize::MAX);
            }
            assert_eq!(min_len(MIN_TASK), 1);
        });
    }
}

//! Where the kernels of one route run: [`Launcher`], a GPU ([`super::device`]) or the
//! CPU through the host launcher ([`super::host`]), behind one launch call.

use std::ffi::c_void;

use super::device::{DeviceState, Stream};
use super::host;
use crate::error::Result;

/// Where the kernels of one route run: a GPU, or the CPU through the host launcher
/// ([`host`]). The launch code is the same for both.
#[derive(Clone, Copy)]
pub enum Launcher {
    Gpu(&'static DeviceState),
    Host,
}

impl Launcher {
    /// The device index of the memory the kernels take ([`host::HOST_INDEX`] for
    /// the CPU).
    pub fn index(self) -> usize {
        match self {
            Launcher::Gpu(d) => d.index,
            Launcher::Host => host::HOST_INDEX,
        }
    }

    /// Launches kernel `name` with [`THREADS`] threads per block: on `stream` of the
    /// GPU, or on the CPU (where it has finished when this returns).
    ///
    /// # Safety
    /// As [`DeviceState::launch`], with the memory of this launcher's device.
    pub(crate) unsafe fn launch(
        self,
        name: &str,
        blocks: u64,
        stream: Stream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        match self {
            // SAFETY: the caller's contract.
            Launcher::Gpu(d) => unsafe { d.launch(name, blocks, stream, args) },
            Launcher::Host if blocks == 0 => Ok(()),
            // SAFETY: the caller's contract.
            Launcher::Host => unsafe { host::launch(name, blocks, args) },
        }
    }

    /// Blocks for a grid-stride loop over `n` elements.
    pub(crate) fn elementwise_blocks(self, n: i64) -> u64 {
        match self {
            Launcher::Gpu(d) => d.elementwise_blocks(n),
            Launcher::Host => host::elementwise_blocks(n),
        }
    }
}

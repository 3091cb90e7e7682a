//! The Python face of the deploy engine (the engine itself is the crate
//! `ovsw-engine`, `crates/ovsw-engine/`, without libtorch or Python): [`from_torch`]
//! reads a trained layer's tensors out of libtorch for the engine's lowering, and [`py`]
//! holds the bindings (`ovsw._core.DeployEngine` and the export functions).

pub mod from_torch;
pub mod py;

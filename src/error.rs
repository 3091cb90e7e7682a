//! Errors of the core, each mapped to the Python exception a user expects, and the
//! boundary that keeps a Rust panic from reaching Python.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

/// What can go wrong in the core. Every public entry point returns `Result<_, Error>`;
/// the bindings turn it into a Python exception naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value or shape the user passed is not acceptable (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// A tensor of the wrong dtype or a wrong kind of object (Python `TypeError`).
    #[error("{0}")]
    Type(String),
    /// libtorch refused an operation (Python `RuntimeError`).
    #[error("libtorch: {0}")]
    Torch(String),
    /// Something the core cannot do with these arguments, for instance a tensor without
    /// storage under `torch.export` (Python `RuntimeError`).
    #[error("{0}")]
    Unsupported(String),
    /// A bug in the core: a broken internal invariant or a panic caught at the
    /// boundary (Python `RuntimeError`).
    #[error("internal error in ovsw._core (please report it): {0}")]
    Internal(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e.to_string())
    }
}

/// The deploy engine's errors (`ovsw-engine`, which has no Python) as the core's. A file
/// the system refuses is `OSError` at the Python boundary (`deploy/py.rs` maps it
/// before this conversion); anywhere else it is a runtime failure.
impl From<ovsw_engine::error::Error> for Error {
    fn from(e: ovsw_engine::error::Error) -> Self {
        match e {
            ovsw_engine::error::Error::Value(m) => Error::Value(m),
            e @ ovsw_engine::error::Error::Io { .. } => Error::Unsupported(e.to_string()),
        }
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        match e {
            Error::Value(m) => PyValueError::new_err(m),
            Error::Type(m) => PyTypeError::new_err(m),
            e @ (Error::Torch(_) | Error::Unsupported(_) | Error::Internal(_)) => {
                PyRuntimeError::new_err(e.to_string())
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::Value(..))` from a format string.
macro_rules! value_err {
    ($($arg:tt)*) => { Err($crate::error::Error::Value(format!($($arg)*))) };
}
pub(crate) use value_err;

/// The message a panic carried.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs `f`; a panic inside it becomes [`Error::Internal`] (converted into `E`) instead
/// of unwinding further.
///
/// The last line of defence at the Python boundary: every binding runs its body
/// through it (`E = PyErr`, so the panic reaches Python as a `RuntimeError`, not as
/// pyo3's `PanicException`, a `BaseException` that `except Exception` misses). The
/// core itself reports errors as values and has no panic to catch.
pub fn boundary<T, E: From<Error>>(
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(Error::Internal(panic_message(payload.as_ref())).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        let r: Result<()> = boundary(|| panic!("boom {}", 42));
        match r {
            Err(Error::Internal(m)) => assert_eq!(m, "boom 42"),
            other => panic!("expected Error::Internal, got {other:?}"),
        }
        let r: Result<()> = boundary(|| std::panic::panic_any(7u8));
        assert!(matches!(r, Err(Error::Internal(m)) if m == "a panic without a message"));
    }

    #[test]
    fn a_panic_of_a_tch_accessor_is_caught() {
        // tch's non-`f_` calls unwrap libtorch's error: an index out of range here is the
        // kind of panic this boundary exists for, raised by the library, not the test.
        let t = tch::Tensor::from_slice(&[1.0f32]);
        let r: Result<f64> = boundary(|| Ok(t.double_value(&[5])));
        assert!(
            matches!(&r, Err(Error::Internal(m)) if m.contains("out of")),
            "{r:?}"
        );
    }

    #[test]
    fn results_pass_through_unchanged() {
        assert!(matches!(boundary(|| Ok::<_, Error>(3)), Ok(3)));
        let r: Result<()> = boundary(|| Err(Error::Value("bad".into())));
        assert!(matches!(r, Err(Error::Value(m)) if m == "bad"));
    }

    #[test]
    fn the_message_names_an_internal_error() {
        let e = Error::Internal("x".into());
        assert_eq!(
            e.to_string(),
            "internal error in ovsw._core (please report it): x"
        );
    }
}

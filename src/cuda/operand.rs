//! What the kernels need to know about a tensor, from its facts ([`crate::facts::facts`]:
//! read through the C++ shim, without a panic).

use tch::{Device, Kind, Tensor};

use super::Outcome;
use crate::error::Result;
use crate::facts::{self, Facts};

/// The dtype code of the kernels (0 f32, 1 f16, 2 bf16), `None` for other dtypes.
pub fn dtype_code(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Float => Some(0),
        Kind::Half => Some(1),
        Kind::BFloat16 => Some(2),
        _ => None,
    }
}

/// The suffix of a kernel's name for `kind` (`f32`, `f16`, `bf16`).
pub fn suffix(kind: Kind) -> Option<&'static str> {
    dtype_code(kind).map(|c| super::compile::DTYPES[c])
}

/// A tensor the kernels can read and write: float32, float16 or bfloat16 strided memory
/// on one CUDA device (its facts read once).
pub struct Operand {
    pub facts: Facts,
    /// The CUDA device index.
    pub index: usize,
    pub kind: Kind,
}

/// `t` as an [`Operand`], or why the kernels cannot take it (`what` names it).
pub fn operand(t: &Tensor, what: &str) -> Result<Outcome<Operand>> {
    Ok(operand_of(&facts::facts(t)?, what))
}

/// The tensor whose facts (read once, by the op's validation) are `facts` as an
/// [`Operand`], or why the kernels cannot take it (`what` names it).
pub fn operand_of(facts: &Facts, what: &str) -> Outcome<Operand> {
    let Some(index) = facts.cuda_kernel_device() else {
        return Outcome::Declined(format!(
            "{what} is a {} tensor on {}; the kernels take float32, float16 and bfloat16 \
             CUDA memory",
            facts.dtype_name(),
            facts.place
        ));
    };
    let Some(kind) = facts.kind else {
        return Outcome::Declined(format!("{what} has an unknown dtype"));
    };
    Outcome::Ran(Operand {
        facts: facts.clone(),
        index,
        kind,
    })
}

/// The device address of a tensor's first element (0 when it has none).
pub fn ptr(t: &Tensor) -> Result<u64> {
    Ok(facts::facts(t)?.data as u64)
}

/// [`ptr`] of `t`, or 0 (a null device pointer) for none.
pub fn opt_ptr(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), ptr)
}

/// The dims of a tensor from outermost to innermost in memory, when it is
/// non-overlapping and dense (a permutation of a contiguous tensor: NCHW-contiguous,
/// channels_last, ...). Size-1 dims may carry any stride.
pub fn dense_order(sizes: &[i64], strides: &[i64]) -> Option<Vec<usize>> {
    if sizes.len() != strides.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    // Outermost first; a size-1 dim sorts by its position (its stride is arbitrary).
    order.sort_by(|&a, &b| {
        let key = |d: usize| if sizes[d] == 1 { -1 } else { strides[d] };
        key(b).cmp(&key(a)).then(a.cmp(&b))
    });
    let mut expected = 1i64;
    for &d in order.iter().rev() {
        if sizes[d] == 1 {
            continue;
        }
        if strides[d] != expected {
            return None;
        }
        expected *= sizes[d];
    }
    Some(order)
}

/// Whether a tensor is dense with dim 0 outermost: slice `i` of dim 0 is the flat range
/// `[i * per, (i + 1) * per)` (NCHW-contiguous and channels_last activations; weights
/// `[O, ...]` in either format).
pub fn dim0_major(sizes: &[i64], strides: &[i64]) -> bool {
    if sizes.is_empty() {
        return false;
    }
    let per: i64 = sizes[1..].iter().product();
    dense_order(sizes, strides).is_some() && (sizes[0] == 1 || strides[0] == per)
}

impl Operand {
    pub fn sizes(&self) -> &[i64] {
        &self.facts.sizes
    }

    pub fn strides(&self) -> &[i64] {
        &self.facts.strides
    }

    pub fn dim(&self) -> usize {
        self.facts.dim()
    }

    pub fn numel(&self) -> i64 {
        self.facts.numel() as i64
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.facts.data as u64
    }

    /// The tensor's device: CUDA device `index`, or the CPU for the host launcher.
    pub fn device(&self) -> Device {
        if self.index == super::host::HOST_INDEX {
            Device::Cpu
        } else {
            Device::Cuda(self.index)
        }
    }

    /// See [`dense_order`].
    pub fn dense_order(&self) -> Option<Vec<usize>> {
        dense_order(self.sizes(), self.strides())
    }

    /// See [`dim0_major`].
    pub fn dim0_major(&self) -> bool {
        dim0_major(self.sizes(), self.strides())
    }

    /// A fresh tensor of this one's shape and strides (so its layout) in `kind`.
    pub fn empty_like(&self, kind: Kind) -> Result<Tensor> {
        Ok(Tensor::f_empty_strided(
            self.sizes(),
            self.strides(),
            (kind, self.device()),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(dense_order, dim0_major)` of `t`, from its facts.
    fn layout_of(t: &Tensor) -> (Option<Vec<usize>>, bool) {
        let f = facts::facts(t).expect("facts");
        (
            dense_order(&f.sizes, &f.strides),
            dim0_major(&f.sizes, &f.strides),
        )
    }

    #[test]
    fn dense_orders() {
        let x = Tensor::zeros([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert_eq!(layout_of(&x), (Some(vec![0, 1, 2, 3]), true));
        // channels_last: strides (60, 1, 15, 3)
        let cl = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        assert_eq!(cl.stride(), vec![60, 1, 15, 3]);
        assert_eq!(layout_of(&cl), (Some(vec![0, 2, 3, 1]), true));
        // batch not outermost: dense, but dim 1 comes first
        let cn = x.permute([1, 0, 2, 3]).contiguous().permute([1, 0, 2, 3]);
        assert_eq!(layout_of(&cn), (Some(vec![1, 0, 2, 3]), false));
        // a strided slice is not dense
        let sliced = x.slice(3, 0, 4, 2);
        assert_eq!(layout_of(&sliced), (None, false));
        // size-1 dims with any stride still count as dense; they sort innermost
        let odd = [7, 5, 99, 1];
        assert_eq!(dense_order(&[1, 3, 1, 5], &odd), Some(vec![1, 3, 0, 2]));
        assert!(dim0_major(&[1, 3, 1, 5], &odd));
        assert!(!dim0_major(&[], &[]));
    }

    #[test]
    fn cpu_tensors_and_float64_are_declined() {
        let x = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let why = match operand(&x, "the input").expect("facts") {
            Outcome::Declined(why) => why,
            Outcome::Ran(_) => panic!("a CPU tensor became an operand"),
        };
        assert!(
            why.contains("the input is a torch.float32 tensor on cpu"),
            "{why}"
        );
        assert_eq!(dtype_code(Kind::BFloat16), Some(2));
        assert_eq!(dtype_code(Kind::Double), None);
        assert_eq!(suffix(Kind::Half), Some("f16"));
        assert_eq!(opt_ptr(None).expect("null"), 0);
        assert_eq!(ptr(&x).expect("ptr"), x.data_ptr() as u64);
    }
}

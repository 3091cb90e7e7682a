//! Shape inference: the (height, width, channels) of every value of the graph for an
//! input size, by the output-size rules the ops themselves use ([`ConvGeom::output_for`],
//! [`Pool::out_hw`]). [`crate::engine::Engine`] checks each input with it before any op
//! runs, so an input the network cannot take is refused up front with a message naming
//! the op that cannot take it, or, for a network that takes one size only, naming the
//! size it was exported for.
//!
//! It also tells, once per network, whether the network accepts any input size: one
//! does unless a `flatten` or `linear` reads a value whose spatial size depends on the
//! input's (`global_avgpool` makes a value independent of it).

use std::fmt;

use crate::error::{value_err, Result};
use crate::float::Pool;
use crate::geom::ConvGeom;

/// The shape of one sample of a value: height, width and channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl fmt::Display for Shape {
    /// `CxHxW`, the order of the NCHW arrays users pass.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.c, self.h, self.w)
    }
}

/// What an op does to the shape of its input.
#[derive(Clone, Debug)]
pub enum Rule {
    /// A float or binary convolution (a binary one may add a residual of its output's
    /// shape).
    Conv(ConvGeom),
    /// Max or average pooling.
    Pool(Pool),
    /// A per-channel op over exactly this many channels (`affine`).
    Channels(usize),
    /// `[h, w, c] -> [1, 1, c]`.
    GlobalAvgPool,
    /// Zero channels added before and after.
    PadChannels(usize, usize),
    /// `[h, w, c] -> [1, 1, h * w * c]`.
    Flatten,
    /// A `[1, 1, inputs]` value to `[1, 1, outputs]`.
    Linear { inputs: usize, outputs: usize },
}

/// One op of the graph as shape inference sees it: reads value `x` (and `residual`),
/// writes value `y`; value 0 is the input.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub rule: Rule,
    pub x: usize,
    pub residual: Option<usize>,
    pub y: usize,
}

/// The graph's shape rules, with what is known once per network.
pub struct Graph {
    steps: Vec<Step>,
    /// The input size the network was exported for (the file header's `input`), kept
    /// only when the network can take it.
    exported: Option<Shape>,
    any_size: bool,
}

impl Graph {
    /// The shape rules of `steps` (in execution order, each writing the next value)
    /// for a network exported for `exported` inputs, when the file records it.
    pub fn new(steps: Vec<Step>, exported: Option<Shape>) -> Graph {
        let any_size = accepts_any_size(&steps);
        let mut graph = Graph {
            steps,
            exported: None,
            any_size,
        };
        // A header's size the network cannot take would make a false message.
        graph.exported = exported.filter(|&e| graph.infer(e).is_ok());
        graph
    }

    /// Whether the network accepts inputs of any height and width (large enough for its
    /// kernels): no `flatten` or `linear` reads a value whose size depends on them.
    pub fn any_size(&self) -> bool {
        self.any_size
    }

    /// The shape of every value (indexed by value; value 0 is `input`), or the error
    /// of the first op that cannot take its input, naming it.
    pub fn infer(&self, input: Shape) -> Result<Vec<Shape>> {
        let mut shapes = Vec::with_capacity(self.steps.len() + 1);
        shapes.push(input);
        for s in &self.steps {
            let read = |v: usize| match shapes.get(v) {
                Some(&shape) => Ok(shape),
                None => value_err!("op '{}' reads value {v} before any op writes it", s.name),
            };
            let x = read(s.x)?;
            let y = step(s, x)?;
            if let Some(r) = s.residual {
                let r = read(r)?;
                if r != y {
                    return value_err!(
                        "layer '{}': residual of {r} does not match its output of {y}",
                        s.name
                    );
                }
            }
            if s.y != shapes.len() {
                return value_err!(
                    "op '{}' writes value {}; the next free value is {}",
                    s.name,
                    s.y,
                    shapes.len()
                );
            }
            shapes.push(y);
        }
        Ok(shapes)
    }

    /// Every value's shape (as [`Graph::infer`]) when the network can take inputs of
    /// `input`; otherwise an error naming the exported size for a network that takes
    /// that size only, or the op that cannot take its input.
    pub fn check(&self, input: Shape) -> Result<Vec<Shape>> {
        match (self.infer(input), self.exported) {
            (Ok(shapes), _) => Ok(shapes),
            (Err(e), Some(exported)) if !self.any_size => value_err!(
                "this network takes {exported} inputs (the size it was exported for); \
                 got {input} ({e})"
            ),
            (Err(e), _) => Err(e),
        }
    }
}

/// The shape op `s` writes for an input of shape `x`, by the rule the op itself uses.
fn step(s: &Step, x: Shape) -> Result<Shape> {
    let name = s.name.as_str();
    Ok(match &s.rule {
        Rule::Conv(g) => {
            let (h, w) = g.output_for(x.h, x.w, x.c, name)?;
            Shape { h, w, c: g.cout }
        }
        Rule::Pool(p) => {
            let (h, w) = p.out_hw(x.h, x.w, name)?;
            Shape { h, w, c: x.c }
        }
        Rule::Channels(c) => {
            if x.c != *c {
                return value_err!("layer '{name}' expects {c} channels, got {}", x.c);
            }
            x
        }
        Rule::GlobalAvgPool => Shape { h: 1, w: 1, c: x.c },
        Rule::PadChannels(before, after) => {
            match x.c.checked_add(*before).and_then(|c| c.checked_add(*after)) {
                Some(c) => Shape { c, ..x },
                None => return value_err!("layer '{name}': {} channels are too many", x.c),
            }
        }
        Rule::Flatten => match x.h.checked_mul(x.w).and_then(|p| p.checked_mul(x.c)) {
            Some(c) => Shape { h: 1, w: 1, c },
            None => return value_err!("layer '{name}': {x} is too large to flatten"),
        },
        Rule::Linear { inputs, outputs } => {
            if (x.h, x.w) != (1, 1) || x.c != *inputs {
                return value_err!(
                    "layer '{name}' expects {inputs} features, got {} ({x}); check the input size",
                    x.h.saturating_mul(x.w).saturating_mul(x.c)
                );
            }
            Shape {
                h: 1,
                w: 1,
                c: *outputs,
            }
        }
    })
}

/// Whether no `flatten` or `linear` of `steps` reads a value whose spatial size
/// depends on the input's: the input's does; an op's output does when a value it reads
/// does, except `global_avgpool`'s (always 1x1).
fn accepts_any_size(steps: &[Step]) -> bool {
    let mut depends = vec![true]; // value 0, the input
    let reads = |depends: &[bool], v: usize| depends.get(v).copied().unwrap_or(true);
    for s in steps {
        let x = reads(&depends, s.x);
        let r = s.residual.is_some_and(|r| reads(&depends, r));
        let y = match s.rule {
            Rule::Flatten | Rule::Linear { .. } if x => return false,
            Rule::GlobalAvgPool => false,
            _ => x || r,
        };
        depends.push(y);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(c: usize, h: usize, w: usize) -> Shape {
        Shape { h, w, c }
    }

    fn conv(cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Rule {
        Rule::Conv(ConvGeom {
            cin,
            cout,
            kh: k,
            kw: k,
            stride: (stride, stride),
            padding: (padding, padding),
            dilation: (1, 1),
            groups: 1,
        })
    }

    fn maxpool(k: usize, ceil_mode: bool) -> Rule {
        Rule::Pool(Pool {
            max: true,
            kernel: (k, k),
            stride: (k, k),
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode,
            count_include_pad: false,
        })
    }

    /// A chain: each rule reads the value the previous one wrote.
    fn chain(rules: Vec<Rule>) -> Vec<Step> {
        rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| Step {
                name: format!("op{i}"),
                rule,
                x: i,
                residual: None,
                y: i + 1,
            })
            .collect()
    }

    /// conv 3->8 (3x3, pad 1), maxpool 2, flatten, linear for an 8x8 input.
    fn fixed_head() -> Vec<Step> {
        chain(vec![
            conv(3, 8, 3, 1, 1),
            maxpool(2, false),
            Rule::Flatten,
            Rule::Linear {
                inputs: 8 * 4 * 4,
                outputs: 10,
            },
        ])
    }

    /// conv 3->8 (stride 2), affine, global average pool, linear: any size.
    fn pooled_head() -> Vec<Step> {
        chain(vec![
            conv(3, 8, 3, 2, 1),
            Rule::Channels(8),
            Rule::GlobalAvgPool,
            Rule::Flatten,
            Rule::Linear {
                inputs: 8,
                outputs: 10,
            },
        ])
    }

    #[test]
    fn shapes_follow_the_ops_rules() {
        let g = Graph::new(fixed_head(), None);
        let got = g.infer(shape(3, 8, 8)).unwrap();
        let want = [
            shape(3, 8, 8),
            shape(8, 8, 8),
            shape(8, 4, 4),
            shape(128, 1, 1),
            shape(10, 1, 1),
        ];
        assert_eq!(got, want);
        // 9x9: the floor of the pooling gives 4x4 again (PyTorch takes it too).
        assert!(g.infer(shape(3, 9, 9)).is_ok());
        let g = Graph::new(pooled_head(), None);
        let got = g.infer(shape(3, 7, 5)).unwrap();
        assert_eq!(got[1], shape(8, 4, 3));
        assert_eq!(got[3], shape(8, 1, 1));
        assert_eq!(got[5], shape(10, 1, 1));
        // ceil_mode keeps the partial window, as the pooling op does
        let g = Graph::new(chain(vec![maxpool(2, true)]), None);
        assert_eq!(g.infer(shape(4, 5, 3)).unwrap()[1], shape(4, 3, 2));
        let g = Graph::new(chain(vec![Rule::PadChannels(2, 3)]), None);
        assert_eq!(g.infer(shape(4, 5, 3)).unwrap()[1], shape(9, 5, 3));
    }

    #[test]
    fn any_size_unless_a_flatten_or_linear_reads_a_size_dependent_value() {
        assert!(!Graph::new(fixed_head(), None).any_size());
        assert!(Graph::new(pooled_head(), None).any_size());
        // a linear straight on a conv's output (no flatten) is fixed-size too
        let steps = chain(vec![
            conv(3, 8, 3, 1, 0),
            Rule::Linear {
                inputs: 8,
                outputs: 2,
            },
        ]);
        assert!(!Graph::new(steps, None).any_size());
        // convs after the global pool read a size-independent value
        let steps = chain(vec![
            conv(3, 8, 3, 1, 1),
            Rule::GlobalAvgPool,
            conv(8, 4, 1, 1, 0),
            Rule::Flatten,
        ]);
        assert!(Graph::new(steps, None).any_size());
        // a residual that depends on the input size makes the sum depend on it
        let mut steps = chain(vec![
            conv(3, 8, 3, 1, 1),
            Rule::GlobalAvgPool,
            conv(8, 8, 1, 1, 0),
            Rule::Flatten,
        ]);
        steps[2].residual = Some(1);
        assert!(!Graph::new(steps, None).any_size());
        assert!(Graph::new(Vec::new(), None).any_size());
    }

    #[test]
    fn a_fixed_size_network_names_the_size_it_was_exported_for() {
        let g = Graph::new(fixed_head(), Some(shape(3, 8, 8)));
        g.check(shape(3, 8, 8)).unwrap();
        let err = g.check(shape(3, 6, 6)).unwrap_err().to_string();
        assert_eq!(
            err,
            "this network takes 3x8x8 inputs (the size it was exported for); got 3x6x6 \
             (layer 'op3' expects 128 features, got 72 (72x1x1); check the input size)"
        );
        // without the size in the header: the op's own message
        let g = Graph::new(fixed_head(), None);
        let err = g.check(shape(3, 6, 6)).unwrap_err().to_string();
        assert!(
            err.starts_with("layer 'op3' expects 128 features, got 72"),
            "{err}"
        );
        // a recorded size the network cannot take is not quoted
        let g = Graph::new(fixed_head(), Some(shape(3, 6, 6)));
        let err = g.check(shape(3, 6, 6)).unwrap_err().to_string();
        assert!(err.starts_with("layer 'op3'"), "{err}");
    }

    #[test]
    fn an_any_size_network_names_the_op_an_input_is_too_small_for() {
        let steps = chain(vec![conv(3, 8, 5, 1, 0), Rule::GlobalAvgPool]);
        let g = Graph::new(steps, Some(shape(3, 32, 32)));
        assert!(g.any_size());
        g.check(shape(3, 5, 9)).unwrap();
        let err = g.check(shape(3, 4, 9)).unwrap_err().to_string();
        assert!(
            err.starts_with("input of 4x9 is too small for layer 'op0' (5x5 kernel"),
            "{err}"
        );
        let g = Graph::new(chain(vec![maxpool(3, false)]), None);
        let err = g.check(shape(3, 2, 2)).unwrap_err().to_string();
        assert_eq!(
            err,
            "input of 2x2 is too small for pooling layer 'op0' (3x3)"
        );
    }

    #[test]
    fn channel_and_residual_mismatches_name_the_op() {
        let g = Graph::new(fixed_head(), None);
        let err = g.check(shape(4, 8, 8)).unwrap_err().to_string();
        assert_eq!(err, "layer 'op0' expects 3 input channels, got 4");
        let g = Graph::new(chain(vec![Rule::Channels(3)]), None);
        let err = g.check(shape(2, 8, 8)).unwrap_err().to_string();
        assert_eq!(err, "layer 'op0' expects 3 channels, got 2");
        // a residual of the right shape, then one a stride-2 conv no longer matches
        let mut steps = chain(vec![conv(3, 3, 3, 1, 1), conv(3, 3, 3, 2, 1)]);
        steps[0].residual = Some(0);
        steps[1].residual = Some(1);
        let g = Graph::new(steps, None);
        let err = g.check(shape(3, 8, 8)).unwrap_err().to_string();
        assert_eq!(
            err,
            "layer 'op1': residual of 3x8x8 does not match its output of 3x4x4"
        );
    }

    #[test]
    fn a_malformed_graph_is_an_error_not_a_panic() {
        let mut steps = chain(vec![Rule::GlobalAvgPool]);
        steps[0].x = 5;
        let err = Graph::new(steps, None).infer(shape(1, 2, 2)).unwrap_err();
        assert!(err.to_string().contains("reads value 5"), "{err}");
        let mut steps = chain(vec![Rule::GlobalAvgPool]);
        steps[0].y = 3;
        let err = Graph::new(steps, None).infer(shape(1, 2, 2)).unwrap_err();
        assert!(err.to_string().contains("writes value 3"), "{err}");
        let steps = chain(vec![Rule::PadChannels(usize::MAX / 2, usize::MAX / 2)]);
        assert!(Graph::new(steps, None).infer(shape(4, 1, 1)).is_err());
        let steps = chain(vec![Rule::Flatten]);
        let huge = shape(usize::MAX / 2, usize::MAX / 2, 4);
        assert!(Graph::new(steps, None).infer(huge).is_err());
    }
}

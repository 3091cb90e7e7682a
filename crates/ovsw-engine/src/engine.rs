//! The graph of a deploy file and its execution: [`Engine::from_bytes`] checks the
//! header's ops and builds one node per op, [`Engine::run`] runs them in order on a
//! rayon pool, freeing each value after its last reader. An input the network cannot
//! take is refused before any op runs ([`crate::shapes`]).

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::Value;

use crate::bitconv::{words_for, BinaryConv, Kernel};
use crate::error::{value_err, Error, Result};
use crate::float::{self, Affine, FloatConv, Linear, Pool};
use crate::format::{self, DType, TensorEntry};
use crate::geom::ConvGeom;
use crate::nhwc::{self, Act, Tensor4};
use crate::par;
use crate::shapes::{self, Rule, Shape, Step};

/// What one op computes.
enum OpKind {
    Conv(FloatConv),
    BConv(BinaryConv),
    Affine(Affine),
    Pool(Pool),
    GlobalAvgPool,
    PadChannels(usize, usize),
    Flatten,
    Linear(Linear),
}

/// One op of the graph: reads value `x` (and `residual`), writes value `y`.
struct Node {
    name: String,
    kind: OpKind,
    x: usize,
    residual: Option<usize>,
    y: usize,
}

impl Node {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            OpKind::Conv(_) => "conv2d",
            OpKind::BConv(_) => "bconv2d",
            OpKind::Affine(_) => "affine",
            OpKind::Pool(ref p) if p.max => "maxpool",
            OpKind::Pool(_) => "avgpool",
            OpKind::GlobalAvgPool => "global_avgpool",
            OpKind::PadChannels(..) => "pad_channels",
            OpKind::Flatten => "flatten",
            OpKind::Linear(_) => "linear",
        }
    }
}

/// What op `kind` does to the shape of its input, for [`crate::shapes`].
fn shape_rule(kind: &OpKind) -> Rule {
    match kind {
        OpKind::Conv(c) => Rule::Conv(c.geom.clone()),
        OpKind::BConv(c) => Rule::Conv(c.geom.clone()),
        OpKind::Affine(a) => Rule::Channels(a.scale.len()),
        OpKind::Pool(p) => Rule::Pool(p.clone()),
        OpKind::GlobalAvgPool => Rule::GlobalAvgPool,
        OpKind::PadChannels(b, a) => Rule::PadChannels(*b, *a),
        OpKind::Flatten => Rule::Flatten,
        OpKind::Linear(l) => Rule::Linear {
            inputs: l.inputs,
            outputs: l.outputs,
        },
    }
}

/// Per-op timing of one run (see [`Engine::profile`]).
pub struct OpTime {
    pub name: String,
    pub op: &'static str,
    pub out_shape: [usize; 4],
    pub seconds: f64,
}

/// A loaded network.
pub struct Engine {
    nodes: Vec<Node>,
    /// For each node, the values whose last reader it is (freed after it runs).
    frees: Vec<Vec<usize>>,
    output: usize,
    values: usize,
    pub input_channels: usize,
    pub header: Value,
    pub kernel: Kernel,
    pool: rayon::ThreadPool,
    threads: usize,
    /// The shape rules of the graph, checked against every input before any op runs.
    shapes: shapes::Graph,
}

/// The CPUs this process may use: `std::thread::available_parallelism`, which on
/// Linux is the size of its CPU affinity mask (`sched_getaffinity`), lowered by a
/// cgroup CPU quota where one is set; 1 where it cannot be told.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `threads` when an engine may run that many: at least 1 and at most
/// [`available_threads`] (more threads than CPUs would only take turns on them, slower
/// than fewer, and a count like 10000 is a mistake). The one check of a thread count,
/// for [`Engine::from_bytes`], [`Engine::set_threads`] and the command lines.
pub fn check_threads(threads: usize) -> Result<usize> {
    if threads == 0 {
        return value_err!("threads must be at least 1");
    }
    let cpus = available_threads();
    if threads > cpus {
        return value_err!(
            "threads={threads} exceeds the {cpus} CPUs this process may use \
             (its CPU affinity and CPU quota)"
        );
    }
    Ok(threads)
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    check_threads(threads)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("ovsw-deploy-{i}"))
        .build()
        .map_err(|e| Error::Value(format!("cannot start {threads} engine threads: {e}")))
}

/// The largest size, stride, padding or channel count a file may state (keeps every
/// shape computation far from overflow).
const MAX_SIZE: usize = 1 << 24;

/// Field access on one op object, with errors naming the op.
struct Fields<'a> {
    op: &'a Value,
    name: String,
    tensors: &'a HashMap<String, TensorEntry>,
    data: &'a [u8],
}

impl Fields<'_> {
    fn err<T>(&self, what: String) -> Result<T> {
        value_err!("corrupt deploy file: op '{}': {what}", self.name)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        match self.op.get(key) {
            Some(v) => Ok(v),
            None => self.err(format!("missing field '{key}'")),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self
            .get(key)?
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
        {
            Some(v) if v <= MAX_SIZE => Ok(v),
            Some(v) => self.err(format!("field '{key}' = {v} exceeds {MAX_SIZE}")),
            None => self.err(format!("field '{key}' is not a non-negative integer")),
        }
    }

    fn pair(&self, key: &str) -> Result<(usize, usize)> {
        let v = self.get(key)?;
        let parsed = v.as_array().filter(|a| a.len() == 2).and_then(|a| {
            let x = a[0].as_u64().and_then(|v| usize::try_from(v).ok())?;
            let y = a[1].as_u64().and_then(|v| usize::try_from(v).ok())?;
            Some((x, y))
        });
        match parsed {
            Some((x, y)) if x <= MAX_SIZE && y <= MAX_SIZE => Ok((x, y)),
            Some(_) => self.err(format!("field '{key}' exceeds {MAX_SIZE}")),
            None => self.err(format!("field '{key}' is not a pair of integers")),
        }
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key)?.as_bool() {
            Some(b) => Ok(b),
            None => self.err(format!("field '{key}' is not a boolean")),
        }
    }

    fn opt_value(&self, key: &str) -> Result<Option<usize>> {
        match self.op.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    fn entry(&self, key: &str) -> Result<Option<&TensorEntry>> {
        match self.op.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) => match self.tensors.get(t) {
                Some(e) => Ok(Some(e)),
                None => self.err(format!(
                    "field '{key}' names tensor '{t}', which is not in the file"
                )),
            },
            Some(_) => self.err(format!("field '{key}' is not a tensor name")),
        }
    }

    /// The bytes of tensor `key`, checked to be `dtype` of `shape`; `None` when the
    /// field is absent or null.
    fn opt_tensor(&self, key: &str, dtype: DType, shape: &[usize]) -> Result<Option<&[u8]>> {
        match self.entry(key)? {
            None => Ok(None),
            Some(e) if e.dtype == dtype && e.shape == shape => {
                Ok(Some(&self.data[e.bytes.clone()]))
            }
            Some(e) => self.err(format!(
                "tensor '{key}' must be {} of shape {shape:?}, found {} of shape {:?}",
                dtype.name(),
                e.dtype.name(),
                e.shape
            )),
        }
    }

    fn opt_f32(&self, key: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        Ok(self.opt_tensor(key, DType::F32, shape)?.map(format::f32s))
    }

    fn f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.opt_f32(key, shape)? {
            Some(v) => Ok(v),
            None => self.err(format!("missing tensor '{key}'")),
        }
    }

    fn opt_u64(&self, key: &str, shape: &[usize]) -> Result<Option<Vec<u64>>> {
        Ok(self.opt_tensor(key, DType::U64, shape)?.map(format::u64s))
    }

    fn geom(&self) -> Result<ConvGeom> {
        let (kh, kw) = self.pair("kernel")?;
        let geom = ConvGeom {
            cin: self.usize("in_channels")?,
            cout: self.usize("out_channels")?,
            kh,
            kw,
            stride: self.pair("stride")?,
            padding: self.pair("padding")?,
            dilation: self.pair("dilation")?,
            groups: self.usize("groups")?,
        };
        geom.check(&self.name)?;
        Ok(geom)
    }

    fn act(&self, channels: usize) -> Result<Act> {
        match self.op.get("act").and_then(Value::as_str).unwrap_or("none") {
            "none" => Ok(Act::None),
            "hardtanh" => {
                let (lo, hi) = match self.get("act_range")?.as_array().map(|a| a.as_slice()) {
                    Some([lo, hi]) => (lo.as_f64(), hi.as_f64()),
                    _ => (None, None),
                };
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo <= hi => Ok(Act::Hardtanh(lo as f32, hi as f32)),
                    _ => self.err("field 'act_range' is not a pair of numbers [min, max]".into()),
                }
            }
            "prelu" => {
                let slopes = match self.entry("prelu")? {
                    Some(e) => e.shape.first().copied().unwrap_or(0),
                    None => 0,
                };
                if slopes != 1 && slopes != channels {
                    return self.err(format!(
                        "PReLU needs 1 or {channels} slopes, the file has {slopes}"
                    ));
                }
                Ok(Act::Prelu(self.f32("prelu", &[slopes])?))
            }
            other => self.err(format!("unknown activation '{other}'")),
        }
    }
}

impl Engine {
    /// Builds an engine from a whole deploy file in memory.
    pub fn from_bytes(bytes: &[u8], threads: usize, kernel: Kernel) -> Result<Engine> {
        let file = format::parse(bytes)?;
        let header = file.header;
        let ops = match header.get("ops").and_then(Value::as_array) {
            Some(ops) if !ops.is_empty() => ops,
            _ => return value_err!("corrupt deploy file: header has no 'ops' list"),
        };
        let input_channels = match header.pointer("/input/channels").and_then(Value::as_u64) {
            Some(c) if c > 0 => c as usize,
            _ => return value_err!("corrupt deploy file: header has no 'input.channels'"),
        };
        let mut defined = vec![true]; // value 0, the input
        let mut nodes = Vec::with_capacity(ops.len());
        let mut steps = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let name = op
                .get("name")
                .and_then(Value::as_str)
                .map_or_else(|| format!("#{i}"), str::to_owned);
            let f = Fields {
                op,
                name: name.clone(),
                tensors: &file.tensors,
                data: file.data,
            };
            let kind = match op.get("op").and_then(Value::as_str) {
                Some("conv2d") => {
                    let geom = f.geom()?;
                    let shape = [geom.cout, geom.kh, geom.kw, geom.cin / geom.groups];
                    let (bias, act) = (f.opt_f32("bias", &[geom.cout])?, f.act(geom.cout)?);
                    OpKind::Conv(FloatConv::new(geom, f.f32("weight", &shape)?, bias, act))
                }
                Some("bconv2d") => {
                    let geom = f.geom()?;
                    let shape = [
                        geom.cout,
                        geom.kh,
                        geom.kw,
                        words_for(geom.cin / geom.groups),
                    ];
                    let weight = match f.opt_u64("weight", &shape)? {
                        Some(w) => w,
                        None => return f.err("missing tensor 'weight'".into()),
                    };
                    let mask = f.opt_u64("weight_mask", &shape)?;
                    let scale = f.f32("scale", &[geom.cout])?;
                    let shift = f.f32("shift", &[geom.cout])?;
                    let act = f.act(geom.cout)?;
                    OpKind::BConv(BinaryConv::new(geom, weight, mask, scale, shift, act))
                }
                Some("affine") => {
                    let c = f.usize("channels")?;
                    OpKind::Affine(Affine {
                        scale: f.f32("scale", &[c])?,
                        shift: f.f32("shift", &[c])?,
                        act: f.act(c)?,
                    })
                }
                Some(kind @ ("maxpool" | "avgpool")) => {
                    let max = kind == "maxpool";
                    let pool = Pool {
                        max,
                        kernel: f.pair("kernel")?,
                        stride: f.pair("stride")?,
                        padding: f.pair("padding")?,
                        dilation: if max { f.pair("dilation")? } else { (1, 1) },
                        ceil_mode: f.bool("ceil_mode")?,
                        count_include_pad: if max {
                            false
                        } else {
                            f.bool("count_include_pad")?
                        },
                    };
                    let sizes = [pool.kernel.0, pool.kernel.1, pool.stride.0, pool.stride.1];
                    if sizes.contains(&0) || pool.dilation.0 == 0 || pool.dilation.1 == 0 {
                        return f.err("zero pooling size".into());
                    }
                    if pool.padding.0 * 2 > pool.kernel.0 || pool.padding.1 * 2 > pool.kernel.1 {
                        return f.err("padding exceeds half the pooling window".into());
                    }
                    OpKind::Pool(pool)
                }
                Some("global_avgpool") => OpKind::GlobalAvgPool,
                Some("pad_channels") => OpKind::PadChannels(f.usize("before")?, f.usize("after")?),
                Some("flatten") => OpKind::Flatten,
                Some("linear") => {
                    let (i, o) = (f.usize("in_features")?, f.usize("out_features")?);
                    if i == 0 || o == 0 {
                        return f.err("zero features".into());
                    }
                    OpKind::Linear(Linear {
                        inputs: i,
                        outputs: o,
                        weight: f.f32("weight", &[o, i])?,
                        bias: f.opt_f32("bias", &[o])?,
                    })
                }
                other => return f.err(format!("unknown op {other:?}")),
            };
            let x = f.usize("x")?;
            let residual = f.opt_value("residual")?;
            if residual.is_some() && !matches!(kind, OpKind::BConv(_)) {
                return f.err("only bconv2d takes a residual".into());
            }
            let y = f.usize("y")?;
            for v in std::iter::once(x).chain(residual) {
                if !defined.get(v).copied().unwrap_or(false) {
                    return f.err(format!("reads value {v} before any op writes it"));
                }
            }
            if y != defined.len() {
                return f.err(format!(
                    "writes value {y}; the next free value is {}",
                    defined.len()
                ));
            }
            defined.push(true);
            steps.push(Step {
                name: name.clone(),
                rule: shape_rule(&kind),
                x,
                residual,
                y,
            });
            nodes.push(Node {
                name,
                kind,
                x,
                residual,
                y,
            });
        }
        let output = match header.get("output").and_then(Value::as_u64) {
            Some(o) if (o as usize) < defined.len() => o as usize,
            _ => return value_err!("corrupt deploy file: 'output' is not a value of the graph"),
        };
        // Free each value after its last reader (the output is never freed).
        let mut last = vec![None; defined.len()];
        for (i, n) in nodes.iter().enumerate() {
            last[n.x] = Some(i);
            if let Some(r) = n.residual {
                last[r] = Some(i);
            }
        }
        let mut frees = vec![Vec::new(); nodes.len()];
        for (v, l) in last.iter().enumerate() {
            if let (Some(i), true) = (l, v != output) {
                frees[*i].push(v);
            }
        }
        // The size the network was exported for, when the header records a sane one.
        let size = |key: &str| {
            let v = header.pointer(&format!("/input/{key}"))?.as_u64()?;
            usize::try_from(v).ok().filter(|&v| v > 0 && v <= MAX_SIZE)
        };
        let exported = match (size("height"), size("width")) {
            (Some(h), Some(w)) => Some(Shape {
                h,
                w,
                c: input_channels,
            }),
            _ => None,
        };
        Ok(Engine {
            nodes,
            frees,
            output,
            values: defined.len(),
            input_channels,
            header,
            kernel,
            pool: build_pool(threads)?,
            threads,
            shapes: shapes::Graph::new(steps, exported),
        })
    }

    /// Whether the network accepts inputs of any height and width (large enough for
    /// its kernels), not only the size it was exported for: no `flatten` or `linear`
    /// reads a value whose size depends on the input's ([`shapes::Graph::any_size`]).
    pub fn accepts_any_size(&self) -> bool {
        self.shapes.any_size()
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.pool = build_pool(threads)?;
        self.threads = threads;
        Ok(())
    }

    /// Runs the network on an input (NHWC); returns the output value (NHWC). A batch of
    /// several images is cut into sub-batches that the threads run whole (see
    /// [`crate::par`]); one image is run op by op, each op splitting its rows.
    pub fn run(&self, input: Tensor4) -> Result<Tensor4> {
        let shapes = self.check_input(&input)?;
        // The largest value of one image, in bytes.
        let peak = shapes
            .iter()
            .map(|s| s.h.saturating_mul(s.w).saturating_mul(s.c))
            .max()
            .unwrap_or(1)
            .saturating_mul(4);
        let n = input.n;
        let sub = par::sub_batch(n, self.threads, peak);
        if sub >= n {
            return self.pool.install(|| self.execute(input, None));
        }
        let parts = input.split_batch(sub)?;
        let outs = self.pool.install(|| {
            parts
                .into_par_iter()
                .map(|part| {
                    let _serial = par::Serial::enter();
                    self.execute(part, None)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Tensor4::concat_batch(outs)
    }

    /// Runs once, op by op over the whole batch, and times every op.
    pub fn profile(&self, input: Tensor4) -> Result<(Tensor4, Vec<OpTime>)> {
        self.check_input(&input)?;
        let mut times = Vec::with_capacity(self.nodes.len());
        let out = self
            .pool
            .install(|| self.execute(input, Some(&mut times)))?;
        Ok((out, times))
    }

    /// The shape of every value for `input`'s size, or why the network cannot take it
    /// (checked before any op runs).
    fn check_input(&self, input: &Tensor4) -> Result<Vec<Shape>> {
        if input.c != self.input_channels {
            return value_err!(
                "the network expects {} input channels, got an input of shape {:?}",
                self.input_channels,
                input.nchw()
            );
        }
        if input.n == 0 || input.h == 0 || input.w == 0 {
            return value_err!("empty input of shape {:?}", input.nchw());
        }
        let elements = nhwc::elements(input.n, input.h, input.w, input.c)?;
        if elements != input.data.len() {
            return value_err!(
                "an input of shape {:?} needs {elements} values, it has {}",
                input.nchw(),
                input.data.len()
            );
        }
        self.shapes.check(Shape {
            h: input.h,
            w: input.w,
            c: input.c,
        })
    }

    /// Runs the graph on `input`, on the calling thread of the pool (ops split their
    /// rows as [`par::min_len`] allows).
    fn execute(&self, input: Tensor4, mut times: Option<&mut Vec<OpTime>>) -> Result<Tensor4> {
        let mut values: Vec<Option<Tensor4>> = vec![None; self.values];
        values[0] = Some(input);
        {
            for (node, frees) in self.nodes.iter().zip(&self.frees) {
                let start = Instant::now();
                // An affine op whose input dies here works in place.
                let owned = match (&node.kind, frees.contains(&node.x)) {
                    (OpKind::Affine(_), true) => values[node.x].take(),
                    _ => None,
                };
                let y = if let (Some(x), OpKind::Affine(a)) = (owned, &node.kind) {
                    a.forward(x, &node.name)?
                } else {
                    let x = values[node.x]
                        .as_ref()
                        .ok_or_else(|| Error::Value(format!("value {} was freed", node.x)))?;
                    let name = node.name.as_str();
                    match &node.kind {
                        OpKind::Conv(c) => c.forward(x, name)?,
                        OpKind::BConv(c) => {
                            let r = node.residual.and_then(|r| values[r].as_ref());
                            c.forward(x, r, self.kernel, name)?
                        }
                        OpKind::Affine(a) => a.forward(x.clone(), name)?,
                        OpKind::Pool(p) => p.forward(x, name)?,
                        OpKind::GlobalAvgPool => float::global_avgpool(x)?,
                        OpKind::PadChannels(b, a) => float::pad_channels(x, *b, *a)?,
                        OpKind::Flatten => float::flatten(x),
                        OpKind::Linear(l) => l.forward(x, name)?,
                    }
                };
                if let Some(t) = times.as_deref_mut() {
                    t.push(OpTime {
                        name: node.name.clone(),
                        op: node.kind_name(),
                        out_shape: y.nchw(),
                        seconds: start.elapsed().as_secs_f64(),
                    });
                }
                values[node.y] = Some(y);
                for &v in frees {
                    values[v] = None;
                }
            }
        }
        values[self.output]
            .take()
            .ok_or_else(|| Error::Value("the graph's output was never written".into()))
    }

    /// Runs the single op `name` on the given input (and residual, for a binary conv
    /// that adds one): for checking an op against the layer it was exported from.
    pub fn run_op(&self, name: &str, x: Tensor4, residual: Option<Tensor4>) -> Result<Tensor4> {
        let node = match self.nodes.iter().find(|n| n.name == name) {
            Some(n) => n,
            None => return value_err!("the network has no op named '{name}'"),
        };
        match (&node.residual, &residual) {
            (Some(_), None) => return value_err!("op '{name}' adds a residual: pass one"),
            (None, Some(_)) => return value_err!("op '{name}' takes no residual"),
            _ => {}
        }
        self.pool.install(|| {
            Ok(match &node.kind {
                OpKind::Conv(c) => c.forward(&x, name)?,
                OpKind::BConv(c) => c.forward(&x, residual.as_ref(), self.kernel, name)?,
                OpKind::Affine(a) => a.forward(x, name)?,
                OpKind::Pool(p) => p.forward(&x, name)?,
                OpKind::GlobalAvgPool => float::global_avgpool(&x)?,
                OpKind::PadChannels(b, a) => float::pad_channels(&x, *b, *a)?,
                OpKind::Flatten => float::flatten(&x),
                OpKind::Linear(l) => l.forward(&x, name)?,
            })
        })
    }

    /// `(name, op)` of every op, in execution order.
    pub fn ops(&self) -> Vec<(String, &'static str)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.kind_name()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_count_is_refused_beyond_the_cpus_this_process_may_use() {
        let cpus = available_threads();
        assert!(cpus >= 1);
        assert_eq!(check_threads(cpus).unwrap(), cpus);
        assert_eq!(check_threads(1).unwrap(), 1);
        let err = check_threads(cpus + 1).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "threads={} exceeds the {cpus} CPUs this process may use \
                 (its CPU affinity and CPU quota)",
                cpus + 1
            )
        );
        assert!(build_pool(10_000).is_err());
        let err = check_threads(0).unwrap_err().to_string();
        assert_eq!(err, "threads must be at least 1");
    }
}

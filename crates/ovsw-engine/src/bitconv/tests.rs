//! Every kernel against bit-by-bit references: the tile kernels (fast and masked, 1 to
//! 4 pixels, block counts around each kernel's grouping, runs around the byte-counter
//! flush), sign packing, and whole convolutions over shapes, strides, padding,
//! dilation, groups, exact zeros, residuals and activations; the grouped route
//! (`grouped.rs`) against the same direct sum and the packed route, and where it is
//! taken.
//!
//! One test per kernel and part. Where the CPU that built the tests lacks a kernel's
//! flag, its tests are ignored with the reason naming the flag (`build.rs` sets
//! `ovsw_cpu_lacks`), so a kernel this CPU cannot run is reported as ignored, never as
//! passed.

use super::simd::isa::{Isa, Job, Run, Runs, Tile};
use super::*;
use crate::lower::{pack_signs, PackedSigns};

/// A small xorshift generator (no dependency for test data).
fn words(n: usize, mut seed: u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        })
        .collect()
}

/// Floats in [-0.5, 0.5) from random words.
fn floats(n: usize, seed: u64) -> Vec<f32> {
    words(n, seed)
        .into_iter()
        .map(|x| ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        .collect()
}

fn bit(x: u64, b: usize) -> bool {
    (x >> b) & 1 == 1
}

/// `sum popcount(a ^ w)` for one word pair, bit by bit.
fn ref_popcount(a: u64, w: u64) -> i64 {
    (0..64).filter(|&b| bit(a, b) != bit(w, b)).count() as i64
}

/// The masked dot product of one word pair, bit by bit: +1 where both masks are set
/// and the signs agree, -1 where they differ.
fn ref_masked(a: u64, am: u64, w: u64, wm: u64) -> i64 {
    (0..64)
        .filter(|&b| bit(am, b) && bit(wm, b))
        .map(|b| if bit(a, b) == bit(w, b) { 1 } else { -1 })
        .sum()
}

/// The kernel by name; a kernel the CPU lacks was ignored by `build.rs`'s cfg, so
/// reaching here without it means the tests were built on another CPU.
fn kernel(name: &str) -> Kernel {
    Kernel::parse(name).unwrap_or_else(|e| {
        panic!("{e}; these tests were built on a CPU that has it: rebuild them on this one")
    })
}

struct TileJob<'a, 'b> {
    tile: &'a Tile<'b>,
    acc: &'a mut [i32],
}

impl Job for TileJob<'_, '_> {
    type Out = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        self.tile.dot(isa, self.acc)
    }
}

/// One tile shape with `pixels` pixels, both kernels, against the references. `runs`
/// are `(word offset, first weight step)`, `steps` the weight's steps per block.
fn check_tile(
    kernel: Kernel,
    runs: &[(usize, usize)],
    run_len: usize,
    steps: usize,
    blocks: usize,
    pixels: usize,
) {
    let runs: Vec<Run> = runs.iter().map(|&(a, w)| Run { a, w }).collect();
    let checked = Runs::new(&runs, run_len, steps);
    let a = words(900, 1);
    let am = words(900, 2);
    let w = words(blocks * steps * LANES, 3);
    let wm = words(blocks * steps * LANES, 4);
    let (base, stride) = (3, 37);
    for masked in [false, true] {
        let tile = if masked {
            Tile::new(
                &a,
                Some(&am),
                (base, stride, pixels),
                &checked,
                &w,
                Some(&wm),
                blocks,
            )
        } else {
            Tile::new(&a, None, (base, stride, pixels), &checked, &w, None, blocks)
        };
        let mut acc = vec![i32::MIN; pixels * blocks * LANES];
        kernel.run(TileJob {
            tile: &tile,
            acc: &mut acc,
        });
        for p in 0..pixels {
            for b in 0..blocks {
                for l in 0..LANES {
                    let mut want = 0;
                    for r in &runs {
                        for j in 0..run_len {
                            let i = base + p * stride + r.a + j;
                            let wi = (b * steps + r.w + j) * LANES + l;
                            want += if masked {
                                ref_masked(a[i], am[i], w[wi], wm[wi])
                            } else {
                                ref_popcount(a[i], w[wi])
                            };
                        }
                    }
                    let got = acc[(p * blocks + b) * LANES + l];
                    assert_eq!(
                        i64::from(got),
                        want,
                        "kernel {}, masked {masked}, {pixels} pixels, runs {runs:?} x \
                         {run_len}, {blocks} blocks: pixel {p} block {b} lane {l}",
                        kernel.name()
                    );
                }
            }
        }
    }
}

/// `(runs as (word offset, first weight step), run length, weight steps, blocks)`.
type TileShape = (&'static [(usize, usize)], usize, usize, usize);

fn check_tiles(name: &str) {
    let kernel = kernel(name);
    // (runs, run length, weight steps, blocks): runs around the byte counters' flush
    // (31 steps), weight steps skipped (a window cut by the padding), no run at all
    // (a window wholly in the padding), block counts around the kernels' groups of 4
    // and 2 blocks.
    let shapes: [TileShape; 9] = [
        (&[(0, 0), (50, 3), (100, 6)], 3, 9, 8),
        (&[(0, 0)], 31, 31, 1),
        (&[(0, 0), (70, 40)], 40, 80, 3),
        (
            &[
                (0, 0),
                (9, 1),
                (18, 2),
                (27, 3),
                (36, 4),
                (45, 5),
                (54, 6),
                (63, 7),
                (72, 8),
            ],
            1,
            9,
            5,
        ),
        (&[(0, 0), (33, 24)], 24, 48, 9),
        (&[(0, 0)], 65, 65, 2),
        (&[(5, 1), (0, 9), (200, 17)], 7, 24, 7),
        (&[(0, 4), (60, 7)], 2, 9, 4),
        (&[], 3, 9, 6),
    ];
    // Pixel counts around the kernels' register tiles of 4.
    for (runs, run_len, steps, blocks) in shapes {
        for pixels in [1, 2, 3, 4, 5, 7, 9] {
            check_tile(kernel, runs, run_len, steps, blocks, pixels);
        }
    }
    check_saturated_tiles(kernel);
}

/// Every bit differing and every mask bit set, so that each step adds the most a byte
/// counter can take (8 per byte): a flush later than the kernels' (or none) overflows.
/// Random words add about half as much and would not show it.
fn check_saturated_tiles(kernel: Kernel) {
    for steps in [31, 32, 62, 63, 64, 200] {
        for blocks in [1, 2, 3, 4, 5, 9] {
            let runs = [Run { a: 0, w: 0 }];
            let checked = Runs::new(&runs, steps, steps);
            let a = vec![0u64; steps + 4];
            let ones = vec![u64::MAX; steps + 4];
            let w = vec![u64::MAX; blocks * steps * LANES];
            let pixels = 5;
            for masked in [false, true] {
                let (am, wm) = if masked {
                    (Some(ones.as_slice()), Some(w.as_slice()))
                } else {
                    (None, None)
                };
                let tile = Tile::new(&a, am, (0, 1, pixels), &checked, &w, wm, blocks);
                let mut acc = vec![i32::MIN; pixels * blocks * LANES];
                kernel.run(TileJob {
                    tile: &tile,
                    acc: &mut acc,
                });
                // 64 differing bits per word: popcounts of 64, or masked dots of -64.
                let want = if masked { -64 } else { 64 } * steps as i32;
                assert!(
                    acc.iter().all(|&v| v == want),
                    "kernel {}, masked {masked}, {steps} steps, {blocks} blocks: {:?} \
                     where all should be {want}",
                    kernel.name(),
                    &acc[..LANES]
                );
            }
        }
    }
}

struct PackTest<'a> {
    ch: &'a [f32],
    out: &'a mut [u64],
}

impl Job for PackTest<'_> {
    type Out = bool;
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) -> bool {
        isa.pack(self.ch, self.out)
    }
}

fn check_pack(name: &str) {
    let kernel = kernel(name);
    for len in [1, 3, 8, 15, 16, 17, 40, 63, 64, 65, 70, 128, 200] {
        let ch: Vec<f32> = floats(len, len as u64)
            .into_iter()
            .map(|v| if v == 0.0 { 0.25 } else { v })
            .collect();
        let mut variants = vec![(ch.clone(), false)];
        for at in [0, len / 2, len - 1] {
            let mut z = ch.clone();
            z[at] = 0.0;
            variants.push((z, true));
            let mut nz = ch.clone();
            nz[at] = -0.0;
            variants.push((nz, true));
        }
        for (values, has_zero) in variants {
            let mut out = vec![u64::MAX; len.div_ceil(BITS)];
            let zero = kernel.run(PackTest {
                ch: &values,
                out: &mut out,
            });
            assert_eq!(zero, has_zero, "kernel {name}, {len} channels: zero flag");
            let mut want = vec![0u64; out.len()];
            pack_channels(&values, &mut want, f32::is_sign_negative);
            assert_eq!(out, want, "kernel {name}, {len} channels: {values:?}");
        }
    }
}

/// sign() with sign(0) = 0, as torch.sign.
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Packs a float weight `[O][C/g][kh][kw]` as the exporter does.
fn pack_weight(w: &[f32], o: usize, cg: usize, kh: usize, kw: usize) -> PackedSigns {
    pack_signs(w, [o, cg, kh, kw]).unwrap()
}

/// One convolution case: `(cin, cout, k, stride, padding, dilation, groups, h, w)`.
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const CASES: [Case; 11] = [
    (70, 16, 3, 1, 1, 1, 1, 9, 7),
    (128, 24, 3, 2, 1, 1, 2, 8, 8),
    (12, 9, 3, 1, 2, 2, 3, 7, 6),
    (64, 8, 1, 2, 0, 1, 1, 5, 5),
    (16, 16, 5, 1, 2, 1, 4, 6, 6),
    (200, 40, 3, 1, 1, 1, 1, 10, 11),
    (64, 64, 3, 1, 1, 1, 1, 12, 12),
    (256, 72, 3, 2, 1, 1, 1, 9, 9),
    (32, 8, 3, 1, 0, 1, 1, 6, 13),
    // padding wider than the kernel: windows entirely in the padding (n_valid = 0)
    (64, 16, 3, 3, 4, 1, 1, 5, 5),
    (96, 32, 3, 1, 1, 2, 2, 9, 10),
];

/// What the layer adds after the dot product.
#[derive(Clone, Copy, Debug)]
enum Tail {
    Plain,
    ResidualHardtanh,
    Prelu,
}

/// A direct float sum of `sign(x) * sign(w)` over the valid taps, then the layer's
/// affine, residual and activation: the reference for a conv of `geom` on `n` images
/// of `h` x `w` (`xf` NHWC, `wf` `[O][C/g][kh][kw]`).
#[allow(clippy::too_many_arguments)]
fn reference(
    geom: &ConvGeom,
    (n, h, w): (usize, usize, usize),
    xf: &[f32],
    wf: &[f32],
    scale: &[f32],
    shift: &[f32],
    residual: Option<&[f32]>,
    act: &Act,
) -> Vec<f32> {
    let (cin, cout, groups) = (geom.cin, geom.cout, geom.groups);
    let (kh, kw) = (geom.kh, geom.kw);
    let (cg, og) = (cin / groups, cout / groups);
    let (oh, ow) = geom.out_hw(h, w, "reference").expect("fits");
    let mut out = vec![0f32; n * oh * ow * cout];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let px = ((b * oh + oy) * ow + ox) * cout;
                for o in 0..cout {
                    let gi = o / og;
                    let mut dot = 0.0f32;
                    for c in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * geom.stride.0 + ky * geom.dilation.0) as isize
                                    - geom.padding.0 as isize;
                                let ix = (ox * geom.stride.1 + kx * geom.dilation.1) as isize
                                    - geom.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xi =
                                    ((b * h + iy as usize) * w + ix as usize) * cin + gi * cg + c;
                                let wi = ((o * cg + c) * kh + ky) * kw + kx;
                                dot += sign(xf[xi]) * sign(wf[wi]);
                            }
                        }
                    }
                    let mut v = scale[o] * dot + shift[o];
                    if let Some(r) = residual {
                        v += r[px + o];
                    }
                    out[px + o] = v;
                }
                act.apply(&mut out[px..px + cout]);
            }
        }
    }
    out
}

fn check_conv(name: &str) {
    let kernel = kernel(name);
    let portable = Kernel::portable();
    let batch = 2;
    for (ci, &case) in CASES.iter().enumerate() {
        let (cin, cout, k, s, p, d, groups, h, w) = case;
        let cg = cin / groups;
        let geom = ConvGeom {
            cin,
            cout,
            kh: k,
            kw: k,
            stride: (s, s),
            padding: (p, p),
            dilation: (d, d),
            groups,
        };
        let (oh, ow) = geom.out_hw(h, w, "t").expect("fits");
        let tail = [Tail::Plain, Tail::ResidualHardtanh, Tail::Prelu][ci % 3];
        let act = match tail {
            Tail::Plain => Act::None,
            Tail::ResidualHardtanh => Act::Hardtanh(-2.0, 1.5),
            Tail::Prelu => Act::Prelu((0..cout).map(|o| 0.1 + o as f32 * 0.01).collect()),
        };
        let residual = matches!(tail, Tail::ResidualHardtanh).then(|| Tensor4 {
            n: batch,
            h: oh,
            w: ow,
            c: cout,
            data: floats(batch * oh * ow * cout, 30 + ci as u64),
        });
        let scale: Vec<f32> = (0..cout).map(|o| 0.5 + o as f32 * 0.25).collect();
        let shift: Vec<f32> = (0..cout).map(|o| o as f32 - 3.0).collect();
        for zeros in ["none", "input", "weight", "both"] {
            let mut wf = floats(cout * cg * k * k, 10 + ci as u64);
            let mut xf = floats(batch * h * w * cin, 20 + ci as u64);
            if zeros == "input" || zeros == "both" {
                xf[5] = 0.0;
                xf[17] = -0.0;
                let last = xf.len() - 1;
                xf[last] = 0.0;
            }
            if zeros == "weight" || zeros == "both" {
                wf[3] = 0.0;
                let last = wf.len() - 1;
                wf[last] = -0.0;
            }
            let packed = pack_weight(&wf, cout, cg, k, k);
            assert_eq!(packed.mask.is_some(), zeros == "weight" || zeros == "both");
            // The packed route, which these kernels run (the grouped one has its test).
            let conv = BinaryConv::with_route(
                geom.clone(),
                packed.bits,
                packed.mask,
                scale.clone(),
                shift.clone(),
                act.clone(),
                false,
            );
            let x = Tensor4 {
                n: batch,
                h,
                w,
                c: cin,
                data: xf.clone(),
            };
            let want = reference(
                &geom,
                (batch, h, w),
                &xf,
                &wf,
                &scale,
                &shift,
                residual.as_ref().map(|r| r.data.as_slice()),
                &act,
            );
            let got = conv
                .forward(&x, residual.as_ref(), kernel, "t")
                .expect("runs");
            let base = conv
                .forward(&x, residual.as_ref(), portable, "t")
                .expect("runs");
            for (i, (&g, &wv)) in got.data.iter().zip(&want).enumerate() {
                let (px, o) = (i / cout, i % cout);
                assert_eq!(
                    g.to_bits(),
                    wv.to_bits(),
                    "kernel {name}, case {case:?} ({tail:?}), zeros in {zeros}: pixel {px} \
                     channel {o}: got {g}, want {wv}"
                );
            }
            assert_eq!(got.data.len(), want.len());
            assert!(
                got.data
                    .iter()
                    .zip(&base.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "kernel {name} differs from portable"
            );
        }
    }
}

/// Random data for one grouped conv: the input `[n][h][w][cin]` and the weight
/// `[O][cg][kh][kw]`, with exact zeros (both signs) in the input, the weight or both.
fn grouped_data(
    geom: &ConvGeom,
    (n, h, w): (usize, usize, usize),
    zeros: &str,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let cg = geom.cin / geom.groups;
    let mut wf = floats(geom.cout * cg * geom.kh * geom.kw, seed);
    let mut xf = floats(n * h * w * geom.cin, seed + 1);
    let pick = |len: usize, k: u64| {
        words(6, seed + k)
            .into_iter()
            .map(move |r| r as usize % len)
    };
    if zeros == "input" || zeros == "both" {
        for (j, at) in pick(xf.len(), 2).enumerate() {
            xf[at] = if j % 2 == 0 { 0.0 } else { -0.0 };
        }
    }
    if zeros == "weight" || zeros == "both" {
        for (j, at) in pick(wf.len(), 3).enumerate() {
            wf[at] = if j % 2 == 0 { 0.0 } else { -0.0 };
        }
    }
    (xf, wf)
}

/// The grouped convs tested: every value of each list below appears (checked), over
/// `CASES` geometries drawn at random: channels per group, outputs per group, kernel
/// sizes, strides, padding, dilation, and the activation with or without a residual.
const GROUPED_CGS: [usize; 5] = [1, 2, 3, 8, 15];
const GROUPED_OGS: [usize; 4] = [1, 2, 3, 9];
const GROUPED_KERNELS: [(usize, usize); 4] = [(1, 1), (3, 3), (5, 5), (3, 1)];
const GROUPED_CASES: u64 = 80;

/// One grouped conv drawn from `seed`: geometry, input size and activation.
fn grouped_case(seed: u64) -> (ConvGeom, (usize, usize), Act, bool) {
    let r = words(12, 1000 + seed);
    let cg = GROUPED_CGS[r[0] as usize % 5];
    let og = GROUPED_OGS[r[1] as usize % 4];
    // Up to 40 groups: output channels past one vector of every instruction set.
    let groups = [1, 2, 5, 13, 40][r[2] as usize % 5];
    let (kh, kw) = GROUPED_KERNELS[r[3] as usize % 4];
    let (s, p, d) = (
        1 + r[4] as usize % 2,
        r[5] as usize % 3,
        1 + r[6] as usize % 2,
    );
    let geom = ConvGeom {
        cin: cg * groups,
        cout: og * groups,
        kh,
        kw,
        stride: (s, s),
        padding: (p, p),
        dilation: (d, d),
        groups,
    };
    // Large enough for one output, small enough to keep the reference quick.
    let min = |k: usize| (d * (k - 1) + 1).saturating_sub(2 * p).max(1);
    let (h, w) = (min(kh) + r[7] as usize % 7, min(kw) + r[8] as usize % 7);
    let cout = geom.cout;
    let act = match r[9] % 4 {
        0 => Act::None,
        1 => Act::Hardtanh(-2.0, 1.5),
        2 => Act::Prelu(vec![0.25]),
        _ => Act::Prelu((0..cout).map(|o| 0.1 + o as f32 * 0.01).collect()),
    };
    (geom, (h, w), act, r[10] % 2 == 1)
}

/// The grouped route with kernel `name` against the direct sum and against the packed
/// route with the portable kernel, bit for bit, over [`grouped_case`]'s geometries with
/// and without exact zeros.
fn check_grouped(name: &str) {
    let kernel = kernel(name);
    let portable = Kernel::portable();
    let batch = 2;
    let mut seen = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for ci in 0..GROUPED_CASES {
        let (geom, (h, w), act, with_residual) = grouped_case(ci);
        let (cg, og) = (geom.cin / geom.groups, geom.cout / geom.groups);
        let cout = geom.cout;
        seen.0.push(cg);
        seen.1.push(og);
        seen.2.push((geom.kh, geom.kw));
        seen.3.push(geom.stride.0);
        seen.4.push(geom.padding.0);
        seen.5.push(geom.dilation.0);
        seen.6.push(
            format!("{act:?}")
                .split('(')
                .next()
                .unwrap_or("")
                .to_owned()
                + if matches!(&act, Act::Prelu(a) if a.len() == 1) {
                    "1"
                } else {
                    ""
                },
        );
        seen.7.push(with_residual);
        let (oh, ow) = geom.out_hw(h, w, "t").expect("fits");
        let residual = with_residual.then(|| Tensor4 {
            n: batch,
            h: oh,
            w: ow,
            c: cout,
            data: floats(batch * oh * ow * cout, 50 + ci),
        });
        let scale: Vec<f32> = (0..cout).map(|o| 0.5 + o as f32 * 0.25).collect();
        let shift: Vec<f32> = (0..cout).map(|o| o as f32 - 3.0).collect();
        for zeros in ["none", "input", "weight", "both"] {
            let (xf, wf) = grouped_data(&geom, (batch, h, w), zeros, 10 * ci);
            let packed = pack_weight(&wf, cout, cg, geom.kh, geom.kw);
            let make = |small| {
                BinaryConv::with_route(
                    geom.clone(),
                    packed.bits.clone(),
                    packed.mask.clone(),
                    scale.clone(),
                    shift.clone(),
                    act.clone(),
                    small,
                )
            };
            let (small, old) = (make(true), make(false));
            assert!(small.grouped.is_some() && old.grouped.is_none());
            let x = Tensor4 {
                n: batch,
                h,
                w,
                c: geom.cin,
                data: xf.clone(),
            };
            let want = reference(
                &geom,
                (batch, h, w),
                &xf,
                &wf,
                &scale,
                &shift,
                residual.as_ref().map(|r| r.data.as_slice()),
                &act,
            );
            let got = small
                .forward(&x, residual.as_ref(), kernel, "t")
                .expect("runs");
            let base = old
                .forward(&x, residual.as_ref(), portable, "t")
                .expect("runs");
            assert_eq!(got.data.len(), want.len());
            assert_eq!(base.data.len(), want.len());
            for (i, ((&g, &wv), &b)) in got.data.iter().zip(&want).zip(&base.data).enumerate() {
                let (px, o) = (i / cout, i % cout);
                assert!(
                    g.to_bits() == wv.to_bits() && g.to_bits() == b.to_bits(),
                    "kernel {name}, grouped case {ci} {geom:?} on {h}x{w}, {act:?}, residual \
                     {with_residual}, zeros in {zeros}: pixel {px} channel {o}: got {g}, \
                     direct sum {wv}, packed route {b}"
                );
            }
        }
    }
    // Every listed value was drawn.
    let has = |v: &[usize], all: &[usize]| all.iter().all(|a| v.contains(a));
    assert!(has(&seen.0, &GROUPED_CGS) && has(&seen.1, &GROUPED_OGS));
    assert!(GROUPED_KERNELS.iter().all(|k| seen.2.contains(k)));
    assert!(has(&seen.3, &[1, 2]) && has(&seen.4, &[0, 1, 2]) && has(&seen.5, &[1, 2]));
    for a in ["None", "Hardtanh", "Prelu", "Prelu1"] {
        assert!(seen.6.iter().any(|s| s == a), "no case with {a}");
    }
    assert!(seen.7.contains(&true) && seen.7.contains(&false));
}

#[test]
fn the_grouped_route_is_taken_for_few_channels_and_outputs_per_group() {
    // (cin, cout, groups, kernel, taken): at most 16 (channel, output) pairs per group,
    // and sums within i16.
    let cases = [
        (32, 32, 32, 3, true),    // depthwise
        (64, 128, 64, 3, true),   // depthwise, channel multiplier 2
        (16, 256, 16, 3, true),   // depthwise, channel multiplier 16
        (16, 272, 16, 3, false),  // 17
        (240, 16, 16, 3, true),   // 15 channels per group
        (256, 16, 16, 3, true),   // 16
        (272, 16, 16, 3, false),  // 17
        (128, 128, 32, 3, true),  // 4 channels, 4 outputs per group
        (128, 160, 32, 3, false), // 4 channels, 5 outputs
        (2, 8, 1, 3, true),       // a dense conv, 2 channels to 8
        (8, 8, 1, 3, false),      // a dense conv, 8 to 8
        (256, 256, 1, 3, false),  // a dense conv
        (256, 16, 16, 45, true),  // 45 x 45 x 16 = 32400 terms
        (256, 16, 16, 46, false), // 33856 overflow i16
    ];
    for (cin, cout, groups, k, taken) in cases {
        let geom = ConvGeom {
            cin,
            cout,
            kh: k,
            kw: k,
            stride: (1, 1),
            padding: (1, 1),
            dilation: (1, 1),
            groups,
        };
        let bits = vec![0u64; cout * k * k * words_for(cin / groups)];
        let conv = BinaryConv::new(
            geom,
            bits,
            None,
            vec![1.0; cout],
            vec![0.0; cout],
            Act::None,
        );
        assert_eq!(
            conv.grouped.is_some(),
            taken,
            "{cin}->{cout} in {groups} groups, {k}x{k}"
        );
    }
}

/// One test per kernel and part, ignored (with the missing flag as the reason) where
/// the CPU that built the tests lacks one of the kernel's flags: each `cfg => reason`
/// pair adds `#[cfg_attr(cfg, ignore = reason)]`. The reasons are literals (libtest
/// shows no reason built by a macro), and at most one of a kernel's cfgs holds.
macro_rules! kernel_tests {
    ($module:ident, $name:literal $(, ($cfg:meta) => $reason:literal)*) => {
        mod $module {
            #[test]
            $(#[cfg_attr($cfg, ignore = $reason)])*
            fn tiles_match_a_bit_by_bit_reference() {
                super::check_tiles($name)
            }
            #[test]
            $(#[cfg_attr($cfg, ignore = $reason)])*
            fn packing_matches_a_bit_by_bit_reference() {
                super::check_pack($name)
            }
            #[test]
            $(#[cfg_attr($cfg, ignore = $reason)])*
            fn convolutions_match_a_direct_sum() {
                super::check_conv($name)
            }
            #[test]
            $(#[cfg_attr($cfg, ignore = $reason)])*
            fn grouped_convolutions_match_a_direct_sum_and_the_packed_route() {
                super::check_grouped($name)
            }
        }
    };
}

kernel_tests!(portable, "portable");
kernel_tests!(
    popcnt,
    "popcnt",
    (ovsw_cpu_lacks = "popcnt") => "this CPU lacks popcnt"
);
kernel_tests!(
    avx2,
    "avx2",
    (ovsw_cpu_lacks = "avx2") => "this CPU lacks avx2"
);
kernel_tests!(
    avx512bw,
    "avx512bw",
    (ovsw_cpu_lacks = "avx512f") => "this CPU lacks avx512f",
    (all(not(ovsw_cpu_lacks = "avx512f"), ovsw_cpu_lacks = "avx512bw"))
        => "this CPU lacks avx512bw"
);
kernel_tests!(
    avx512_vpopcntdq,
    "avx512_vpopcntdq",
    (ovsw_cpu_lacks = "avx512f") => "this CPU lacks avx512f",
    (all(not(ovsw_cpu_lacks = "avx512f"), ovsw_cpu_lacks = "avx512_vpopcntdq"))
        => "this CPU lacks avx512_vpopcntdq"
);

#[test]
fn every_kernel_has_its_tests() {
    let tested = ["portable", "popcnt", "avx2", "avx512bw", "avx512_vpopcntdq"];
    let mut names = Kernel::NAMES.to_vec();
    names.sort_unstable();
    let mut tested = tested.to_vec();
    tested.sort_unstable();
    assert_eq!(names, tested);
}

/// Throughput of each kernel this CPU runs on ResNet-18 layer1- and layer4-sized tiles
/// (run by hand: `cargo test --release --lib kernel_throughput -- --ignored
/// --nocapture`). One binary multiply-accumulate is one bit of `a ^ w`.
#[test]
#[ignore]
fn kernel_throughput() {
    // (label, words per run (3 runs), blocks, output pixels of the layer)
    let layers = [
        ("layer1 64->64 56x56", 3, 8, 3136usize),
        ("layer4 512->512 7x7", 24, 64, 49),
    ];
    for kernel in Kernel::available().expect("kernels") {
        for (label, run_len, blocks, pixels) in layers {
            let a = words(4096, 3);
            let runs: Vec<Run> = (0..3)
                .map(|r| Run {
                    a: r * 1000,
                    w: r * run_len,
                })
                .collect();
            let steps = runs.len() * run_len;
            let checked = Runs::new(&runs, run_len, steps);
            let w = words(blocks * steps * LANES, 4);
            // Spans of 16 pixels, as the driver calls the kernels for a 56-wide row.
            let span = 16;
            let tile = Tile::new(&a, None, (0, 24, span), &checked, &w, None, blocks);
            let mut acc = vec![0i32; span * blocks * LANES];
            let calls = pixels.div_ceil(span) * 20;
            let t = std::time::Instant::now();
            for _ in 0..calls {
                kernel.run(TileJob {
                    tile: &tile,
                    acc: &mut acc,
                });
                std::hint::black_box(&acc);
            }
            let dt = t.elapsed().as_secs_f64();
            let words = (calls * span * blocks * steps * LANES) as f64;
            println!(
                "{:<17} {label}: {:.3} ms per layer, {:.2} Gword/s, {:.0} G binary MAC/s",
                kernel.name(),
                dt * 1e3 / 20.0,
                words / dt / 1e9,
                words * 64.0 / dt / 1e9
            );
        }
    }
}

/// Time of whole binary convolutions of ResNet18_1w1a at 224 (random data, with
/// residual and hardtanh), and of their sign packing alone, per kernel this CPU runs
/// (run by hand: `cargo test --release --lib conv_throughput -- --ignored --nocapture`).
#[test]
#[ignore]
fn conv_throughput() {
    // (cin, cout, stride, input size)
    let layers = [
        (64, 64, 1, 56),
        (64, 128, 2, 56),
        (128, 128, 1, 28),
        (256, 256, 1, 14),
        (512, 512, 1, 7),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    for kernel in Kernel::available().expect("kernels") {
        for (cin, cout, s, hw) in layers {
            let geom = ConvGeom {
                cin,
                cout,
                kh: 3,
                kw: 3,
                stride: (s, s),
                padding: (1, 1),
                dilation: (1, 1),
                groups: 1,
            };
            let (oh, ow) = geom.out_hw(hw, hw, "t").expect("fits");
            let bits = pack_weight(&floats(cout * cin * 9, 1), cout, cin, 3, 3).bits;
            let conv = BinaryConv::new(
                geom,
                bits,
                None,
                vec![0.5; cout],
                vec![0.1; cout],
                Act::Hardtanh(-1.0, 1.0),
            );
            let x = Tensor4 {
                n: 1,
                h: hw,
                w: hw,
                c: cin,
                data: floats(hw * hw * cin, 2),
            };
            let r = Tensor4 {
                n: 1,
                h: oh,
                w: ow,
                c: cout,
                data: floats(oh * ow * cout, 3),
            };
            let time = |f: &dyn Fn()| {
                let mut best = f64::MAX;
                for _ in 0..10 {
                    let t = std::time::Instant::now();
                    for _ in 0..20 {
                        f();
                    }
                    best = best.min(t.elapsed().as_secs_f64() / 20.0);
                }
                best * 1e3
            };
            let whole = pool.install(|| {
                time(&|| {
                    std::hint::black_box(conv.forward(&x, Some(&r), kernel, "t").expect("runs"));
                })
            });
            let pack = pool.install(|| {
                time(&|| {
                    std::hint::black_box(conv.pack(&x, kernel));
                })
            });
            println!(
                "{:<17} {cin}->{cout} {hw}x{hw} s{s}: conv {whole:.4} ms, of which packing {pack:.4} ms",
                kernel.name()
            );
        }
    }
}

/// Time of the grouped and the packed route on one thread for convs of few channels or
/// outputs per group around the threshold of [`grouped::fits`], per kernel this CPU
/// runs (run by hand: `cargo test --release --lib route_throughput -- --ignored
/// --nocapture`): 3x3, 28x28, batch 1.
#[test]
#[ignore]
fn route_throughput() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let hw = 28;
    // (channels per group, outputs per group, groups)
    let shapes = [
        (1, 1, 256),
        (2, 2, 64),
        (4, 4, 32),
        (8, 8, 16),
        (15, 1, 16),
        (16, 1, 16),
        (32, 1, 8),
        (1, 16, 16),
        (2, 32, 8),
        (4, 64, 1),
        (8, 16, 16),
    ];
    for kernel in Kernel::available().expect("kernels") {
        for (cg, og, groups) in shapes {
            let (cin, cout) = (cg * groups, og * groups);
            let geom = ConvGeom {
                cin,
                cout,
                kh: 3,
                kw: 3,
                stride: (1, 1),
                padding: (1, 1),
                dilation: (1, 1),
                groups,
            };
            let bits = pack_weight(&floats(cout * cg * 9, 1), cout, cg, 3, 3).bits;
            let x = Tensor4 {
                n: 1,
                h: hw,
                w: hw,
                c: cin,
                data: floats(hw * hw * cin, 2),
            };
            let time = |small: bool| {
                let conv = BinaryConv::with_route(
                    geom.clone(),
                    bits.clone(),
                    None,
                    vec![0.5; cout],
                    vec![0.1; cout],
                    Act::Hardtanh(-1.0, 1.0),
                    small,
                );
                pool.install(|| {
                    let mut best = f64::MAX;
                    for _ in 0..5 {
                        let t = std::time::Instant::now();
                        for _ in 0..10 {
                            std::hint::black_box(
                                conv.forward(&x, None, kernel, "t").expect("runs"),
                            );
                        }
                        best = best.min(t.elapsed().as_secs_f64() / 10.0);
                    }
                    best * 1e3
                })
            };
            let (grouped, packed) = (time(true), time(false));
            println!(
                "{:<17} cg {cg:>2} og {og:>2} groups {groups:>3}: grouped {grouped:.3} ms, \
                 packed {packed:.3} ms, {:.1}x{}",
                kernel.name(),
                packed / grouped,
                if grouped::fits(&geom) {
                    " (grouped taken)"
                } else {
                    ""
                }
            );
        }
    }
}

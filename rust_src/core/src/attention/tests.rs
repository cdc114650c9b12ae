//! The kernel against a float64 reference, for every engine this CPU has.

use super::*;
use half::{bf16, f16};

/// Deterministic values in [-2, 2).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// `softmax(scale q k^T + mask) v` in f64, with the kernel's conventions (a fully masked row is 0).
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &Dims,
    layout: Layout,
    mask: Option<&dyn Fn(usize, usize, usize, usize) -> Option<f64>>,
    scale: f64,
) -> Vec<f64> {
    let Dims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        v_head_dim: dv,
    } = *dims;
    let (qs, ks, vs, os) = (
        layout.strides(heads, q_len, d),
        layout.strides(heads, kv_len, d),
        layout.strides(heads, kv_len, dv),
        layout.strides(heads, q_len, dv),
    );
    let mut out = vec![0f64; batch * heads * q_len * dv];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..q_len {
                let qi = &q[qs.offset(b, h, i)..][..d];
                let logits: Vec<Option<f64>> = (0..kv_len)
                    .map(|j| {
                        let kj = &k[ks.offset(b, h, j)..][..d];
                        let s: f64 = qi
                            .iter()
                            .zip(kj)
                            .map(|(&a, &c)| f64::from(a) * f64::from(c))
                            .sum();
                        match mask {
                            None => Some(s * scale),
                            Some(m) => m(b, h, i, j).map(|add| s * scale + add),
                        }
                    })
                    .collect();
                let mx = logits
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                if mx == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = logits
                    .iter()
                    .map(|l| l.map_or(0.0, |l| (l - mx).exp()))
                    .collect();
                let sum: f64 = w.iter().sum();
                let o = &mut out[os.offset(b, h, i)..][..dv];
                for (j, wj) in w.iter().enumerate() {
                    let vj = &v[vs.offset(b, h, j)..][..dv];
                    for (x, &y) in o.iter_mut().zip(vj) {
                        *x += wj / sum * f64::from(y);
                    }
                }
            }
        }
    }
    out
}

/// max |got - want| / max |want|.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs())
        .fold(0.0, f64::max)
        / scale
}

fn dims(batch: usize, heads: usize, q_len: usize, kv_len: usize, d: usize, dv: usize) -> Dims {
    Dims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        v_head_dim: dv,
    }
}

/// Runs the kernel on `T` inputs made from `q, k, v` and returns the output as f32.
#[allow(clippy::too_many_arguments)]
fn run<T: Element + OutElement>(
    conv: fn(f32) -> T,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &Dims,
    layout: Layout,
    mask: Option<&Mask<'_>>,
    opts: &Options,
) -> (Vec<f32>, Stats) {
    let (q, k, v): (Vec<T>, Vec<T>, Vec<T>) = (
        q.iter().map(|&x| conv(x)).collect(),
        k.iter().map(|&x| conv(x)).collect(),
        v.iter().map(|&x| conv(x)).collect(),
    );
    let mut out = vec![conv(0.0); dims.lens().unwrap()[3]];
    let stats = attention(&q, &k, &v, &mut out, dims, layout, mask, opts).unwrap();
    (out.iter().map(|x| x.to_f32()).collect(), stats)
}

fn round_trip<T: Element + OutElement>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

const SHAPES: [(usize, usize, usize, usize, usize, usize); 6] = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 7, 5, 8, 8),
    (1, 2, 130, 77, 64, 64),
    (1, 1, 65, 200, 40, 24),
    (2, 2, 300, 513, 17, 33),
    (1, 3, 13, 129, 128, 128),
];

fn blocks_for(i: usize) -> Option<Blocks> {
    // Exercise odd blocks as well as the planner's.
    match i % 3 {
        0 => None,
        1 => Some(Blocks {
            block_q: 7,
            block_kv: 64,
            heads_per_group: 2,
        }),
        _ => Some(Blocks {
            block_q: 50,
            block_kv: 192,
            heads_per_group: 1,
        }),
    }
}

#[test]
fn every_engine_matches_f64_on_odd_shapes_in_both_layouts() {
    for engine in Engine::supported() {
        for (i, &(b, h, nq, nk, d, dv)) in SHAPES.iter().enumerate() {
            for layout in [Layout::Bhnd, Layout::Bnhd] {
                let dm = dims(b, h, nq, nk, d, dv);
                let [ql, kl, vl, _] = dm.lens().unwrap();
                let (q, k, v) = (data(ql, 1 + i as u64), data(kl, 2), data(vl, 3));
                let opts = Options {
                    scale: None,
                    blocks: blocks_for(i),
                    engine: Some(engine),
                };
                let scale = 1.0 / (d as f64).sqrt();
                if engine != Engine::Avx512Bf16 {
                    let want = reference(&q, &k, &v, &dm, layout, None, scale);
                    let (got, _) = run(|x| x, &q, &k, &v, &dm, layout, None, &opts);
                    let e = rel_err(&got, &want);
                    assert!(e < 1e-5, "{engine:?} f32 {dm:?} {layout:?}: {e:e}");
                    let (q16, k16, v16) = (
                        round_trip::<f16>(&q),
                        round_trip::<f16>(&k),
                        round_trip::<f16>(&v),
                    );
                    let want = reference(&q16, &k16, &v16, &dm, layout, None, scale);
                    let (got, _) = run(f16::from_f32, &q, &k, &v, &dm, layout, None, &opts);
                    let e = rel_err(&got, &want);
                    assert!(e < 2e-3, "{engine:?} f16 {dm:?} {layout:?}: {e:e}");
                }
                let (qb, kb, vb) = (
                    round_trip::<bf16>(&q),
                    round_trip::<bf16>(&k),
                    round_trip::<bf16>(&v),
                );
                let want = reference(&qb, &kb, &vb, &dm, layout, None, scale);
                let (got, _) = run(bf16::from_f32, &q, &k, &v, &dm, layout, None, &opts);
                let e = rel_err(&got, &want);
                assert!(e < 1e-2, "{engine:?} bf16 {dm:?} {layout:?}: {e:e}");
            }
        }
    }
}

#[test]
fn masks_broadcast_and_fully_masked_rows_are_zero() {
    let dm = dims(2, 3, 37, 150, 16, 16);
    let [ql, kl, vl, _] = dm.lens().unwrap();
    let (q, k, v) = (data(ql, 4), data(kl, 5), data(vl, 6));
    // bool (1, 3, 37, 150): row 5 of every head fully masked, otherwise a pattern. The "true" bytes are
    // 1, 2 and 255: a numpy/torch bool array may hold any nonzero byte, and all of them mean attend.
    let keep: Vec<u8> = (0..3 * 37 * 150)
        .map(|x| {
            let (i, j) = ((x / 150) % 37, x % 150);
            let attend = i != 5 && (i + j) % 3 != 0;
            if attend {
                [1, 2, 255][j % 3]
            } else {
                0
            }
        })
        .collect();
    // additive (2, 1, 1, 150): a per-batch key bias with some -inf.
    let add: Vec<f32> = (0..300)
        .map(|x| {
            if x % 7 == 0 {
                f32::NEG_INFINITY
            } else {
                (x % 5) as f32 * 0.3 - 0.6
            }
        })
        .collect();
    let scale = 0.3;
    for engine in Engine::supported() {
        let conv = |x: f32| x;
        for layout in [Layout::Bhnd, Layout::Bnhd] {
            let opts = Options {
                scale: Some(scale as f32),
                blocks: Some(Blocks {
                    block_q: 16,
                    block_kv: 64,
                    heads_per_group: 4,
                }),
                engine: Some(engine),
            };
            let m = Mask {
                values: MaskValues::Bool(&keep),
                shape: [1, 3, 37, 150],
            };
            let f = |_b: usize, h: usize, i: usize, j: usize| {
                (keep[(h * 37 + i) * 150 + j] != 0).then_some(0.0)
            };
            let (qq, kk, vv) = if engine == Engine::Avx512Bf16 {
                (
                    round_trip::<bf16>(&q),
                    round_trip::<bf16>(&k),
                    round_trip::<bf16>(&v),
                )
            } else {
                (q.clone(), k.clone(), v.clone())
            };
            let want = reference(&qq, &kk, &vv, &dm, layout, Some(&f), scale);
            let (got, _) = if engine == Engine::Avx512Bf16 {
                run(bf16::from_f32, &q, &k, &v, &dm, layout, Some(&m), &opts)
            } else {
                run(conv, &q, &k, &v, &dm, layout, Some(&m), &opts)
            };
            let tol = if engine == Engine::Avx512Bf16 {
                1e-2
            } else {
                1e-5
            };
            assert!(rel_err(&got, &want) < tol, "{engine:?} bool {layout:?}");
            let os = layout.strides(3, 37, 16);
            for b in 0..2 {
                for h in 0..3 {
                    assert!(got[os.offset(b, h, 5)..][..16].iter().all(|&x| x == 0.0));
                }
            }

            let m = Mask {
                values: MaskValues::F32(&add),
                shape: [2, 1, 1, 150],
            };
            let f = |b: usize, _h: usize, _i: usize, j: usize| {
                let a = add[b * 150 + j];
                (a != f32::NEG_INFINITY).then_some(f64::from(a))
            };
            let want = reference(&qq, &kk, &vv, &dm, layout, Some(&f), scale);
            let (got, _) = if engine == Engine::Avx512Bf16 {
                run(bf16::from_f32, &q, &k, &v, &dm, layout, Some(&m), &opts)
            } else {
                run(conv, &q, &k, &v, &dm, layout, Some(&m), &opts)
            };
            assert!(rel_err(&got, &want) < tol, "{engine:?} additive {layout:?}");
        }
    }
}

#[test]
fn nan_reaches_the_outputs_it_touches_as_in_torch() {
    let dm = dims(1, 2, 20, 90, 8, 8);
    let [ql, kl, vl, _] = dm.lens().unwrap();
    for engine in Engine::supported() {
        let opts = Options {
            engine: Some(engine),
            ..Options::default()
        };
        let conv: fn(f32) -> bf16 = bf16::from_f32;
        let go = |q: &[f32], k: &[f32], v: &[f32]| {
            if engine == Engine::Avx512Bf16 {
                run(conv, q, k, v, &dm, Layout::Bhnd, None, &opts).0
            } else {
                run(|x| x, q, k, v, &dm, Layout::Bhnd, None, &opts).0
            }
        };
        let (q, k, v) = (data(ql, 7), data(kl, 8), data(vl, 9));
        // NaN in q row 3 of head 0: only that output row.
        let mut qn = q.clone();
        qn[3 * 8 + 2] = f32::NAN;
        let out = go(&qn, &k, &v);
        for (i, row) in out.chunks(8).enumerate() {
            assert_eq!(
                row.iter().all(|x| x.is_nan()),
                i == 3,
                "{engine:?} q row {i}"
            );
        }
        // NaN in key 50 of head 1: every row of head 1.
        let mut kn = k.clone();
        kn[(90 + 50) * 8] = f32::NAN;
        let out = go(&q, &kn, &v);
        for (i, row) in out.chunks(8).enumerate() {
            assert_eq!(
                row.iter().all(|x| x.is_nan()),
                i >= 20,
                "{engine:?} k row {i}"
            );
        }
        // NaN in value 70, column 5 of head 0: column 5 of every row of head 0.
        let mut vn = v.clone();
        vn[70 * 8 + 5] = f32::NAN;
        let out = go(&q, &k, &vn);
        for (i, row) in out.chunks(8).enumerate() {
            for (c, x) in row.iter().enumerate() {
                assert_eq!(x.is_nan(), i < 20 && c == 5, "{engine:?} v row {i} col {c}");
            }
        }
    }
}

#[test]
fn no_keys_gives_zeros_and_no_queries_gives_nothing() {
    for engine in Engine::supported() {
        let opts = Options {
            engine: Some(engine),
            ..Options::default()
        };
        let dm = dims(1, 2, 3, 0, 8, 8);
        let q = data(48, 1);
        let mut out = vec![bf16::from_f32(5.0); 48];
        let qb: Vec<bf16> = q.iter().map(|&x| bf16::from_f32(x)).collect();
        attention(&qb, &[], &[], &mut out, &dm, Layout::Bnhd, None, &opts).unwrap();
        assert!(out.iter().all(|x| x.to_f32() == 0.0));
        let dm = dims(1, 2, 0, 4, 8, 8);
        let kv = vec![bf16::from_f32(1.0); 64];
        attention::<bf16>(&[], &kv, &kv, &mut [], &dm, Layout::Bhnd, None, &opts).unwrap();
    }
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let dm = dims(1, 2, 3, 4, 8, 8);
    let opts = Options::default();
    let q = vec![0f32; 48];
    let kv = vec![0f32; 64];
    let mut out = vec![0f32; 48];
    let e = attention(&q[..47], &kv, &kv, &mut out, &dm, Layout::Bhnd, None, &opts).unwrap_err();
    assert!(e.to_string().contains("q has 47 elements"), "{e}");
    let e = attention(&q, &kv, &kv[..1], &mut out, &dm, Layout::Bhnd, None, &opts).unwrap_err();
    assert!(e.to_string().contains("v has 1"), "{e}");
    let bad = Options {
        blocks: Some(Blocks {
            block_q: 4,
            block_kv: 100,
            heads_per_group: 1,
        }),
        ..Options::default()
    };
    let e = attention(&q, &kv, &kv, &mut out, &dm, Layout::Bhnd, None, &bad).unwrap_err();
    assert!(e.to_string().contains("multiple of 64"), "{e}");
    let huge = dims(usize::MAX / 2, 4, 3, 4, 8, 8);
    assert!(attention(&q, &kv, &kv, &mut out, &huge, Layout::Bhnd, None, &opts).is_err());
    let e = attention(
        &q,
        &kv,
        &kv,
        &mut out,
        &dm,
        Layout::Bhnd,
        None,
        &Options {
            engine: Some(Engine::Avx512Bf16),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("bfloat16") || e.to_string().contains("lacks"),
        "{e}"
    );
}

#[test]
fn measured_scratch_never_exceeds_the_prediction() {
    for engine in Engine::supported() {
        for (i, &(b, h, nq, nk, d, dv)) in SHAPES.iter().enumerate() {
            let dm = dims(b, h, nq, nk, d, dv);
            let [ql, kl, vl, _] = dm.lens().unwrap();
            let (q, k, v) = (data(ql, 1), data(kl, 2), data(vl, 3));
            let opts = Options {
                scale: None,
                blocks: blocks_for(i),
                engine: Some(engine),
            };
            let (_, st) = run(bf16::from_f32, &q, &k, &v, &dm, Layout::Bhnd, None, &opts);
            assert!(st.peak_scratch_bytes > 0);
            assert!(
                st.peak_scratch_bytes <= st.predicted_scratch_bytes,
                "{engine:?} {dm:?}: {st:?}"
            );
            let plan = crate::plan::attention::plan_attention(&crate::plan::attention::Request {
                dims: dm,
                dtype_bytes: 2,
                budget_bytes: 0,
                threads: st.threads,
                torch_threads: 0,
                engine: None,
            })
            .unwrap();
            if opts.blocks.is_none() {
                assert!(
                    st.peak_scratch_bytes <= plan.kernel.total,
                    "{engine:?} {dm:?}"
                );
            }
        }
    }
}

/// Micro-benchmark of the engines' GEMMs alone on attention block shapes (single thread):
/// `cargo test --release --lib gemm_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn gemm_speed() {
    use super::engine::{avx512, portable::Portable, Micro};
    fn time<M: Micro>(eng: M, name: &str, d: usize) {
        let (rows, keys, dv_pad) = (128usize, 512usize, d);
        let sizes = M::ENGINE.layout_sizes(d, d);
        let q = vec![bytemuck::Zeroable::zeroed(); rows * sizes.q_row];
        let k = vec![bytemuck::Zeroable::zeroed(); keys / PANEL * sizes.k_panel];
        let v = vec![bytemuck::Zeroable::zeroed(); keys / PANEL * sizes.v_panel];
        let p = vec![bytemuck::Zeroable::zeroed(); rows * keys];
        let mut s = vec![0f32; rows * keys];
        let mut o = vec![0f32; rows * dv_pad];
        let corr = vec![1f32; rows];
        let reps = 400;
        let flops = 2.0 * (rows * keys * d * reps) as f64;
        let mut best = [f64::MAX; 2];
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                eng.qk(&q, sizes.q_row, rows, d, &k, keys / PANEL, &mut s, keys);
            }
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for _ in 0..reps {
                eng.pv(&p, keys, rows, keys, &v, dv_pad, &mut o, &corr);
            }
            best[1] = best[1].min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name} d={d}: QK^T {:.0} GFLOP/s, PV {:.0} GFLOP/s",
            flops / best[0] / 1e9,
            flops / best[1] / 1e9
        );
    }
    for d in [64, 128] {
        time(Portable, "portable", d);
        if let Some(e) = avx512::F32::detect() {
            time(e, "avx512", d);
        }
        if let Some(e) = avx512::Bf16::detect() {
            time(e, "avx512-bf16", d);
        }
    }
}

#[test]
fn the_engine_for_a_type_is_the_one_the_kernel_runs() {
    use crate::quant::FloatType;
    assert_eq!(Engine::for_type(FloatType::F32), Engine::auto::<f32>());
    assert_eq!(
        Engine::for_type(FloatType::F16),
        Engine::auto::<half::f16>()
    );
    assert_eq!(
        Engine::for_type(FloatType::Bf16),
        Engine::auto::<half::bf16>()
    );
    for t in [FloatType::F32, FloatType::F16] {
        assert_ne!(Engine::for_type(t), Engine::Avx512Bf16, "{t:?}");
    }
    for t in [FloatType::F32, FloatType::F16, FloatType::Bf16] {
        let e = Engine::for_type(t);
        assert!(e.is_supported(), "{t:?}: {e:?}");
        assert_eq!(FloatType::parse(t.name()).unwrap(), t);
    }
    let (q, k, v) = (
        vec![0.5f32; 2 * 16],
        vec![0.25f32; 3 * 16],
        vec![1.0f32; 3 * 16],
    );
    let mut o = vec![0f32; 2 * 16];
    let dims = Dims {
        batch: 1,
        heads: 1,
        q_len: 2,
        kv_len: 3,
        head_dim: 16,
        v_head_dim: 16,
    };
    let stats = attention(
        &q,
        &k,
        &v,
        &mut o,
        &dims,
        Layout::Bhnd,
        None,
        &Options::default(),
    )
    .unwrap();
    assert_eq!(stats.engine, Engine::for_type(FloatType::F32));
    assert!(FloatType::parse("float64")
        .unwrap_err()
        .to_string()
        .contains("accepted: float32"));
}

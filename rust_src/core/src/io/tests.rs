//! Tests of the streaming core: round trips against the kernels, every refusal, and a fuzz of the header
//! reader (proptest over mutated headers, plus the committed corpus of bad files).

use super::plan::{Granularity, LayerSpec, Options, QUANT_METADATA_KEY};
use super::write::{write_file_with, Sink};
use super::*;
use crate::quant::{self, hadamard, Format};
use half::bf16;
use proptest::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 - 504.0) / 97.0)
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

/// Name -> (dtype, shape, bytes).
type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// A model-like file written by the safetensors crate itself.
fn sample(dir: &Path) -> (PathBuf, Tensors) {
    let mut t: Tensors = HashMap::new();
    t.insert(
        "blocks.0.attn.qkv.weight".into(),
        (Dtype::BF16, vec![96, 256], bf16_bytes(&values(96 * 256, 1))),
    );
    t.insert(
        "blocks.0.attn.qkv.bias".into(),
        (Dtype::BF16, vec![96], bf16_bytes(&values(96, 2))),
    );
    t.insert(
        "blocks.0.mlp.weight".into(),
        (
            Dtype::F32,
            vec![40, 64],
            values(40 * 64, 3)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    );
    t.insert(
        "norm.weight".into(),
        (Dtype::BF16, vec![256], bf16_bytes(&values(256, 4))),
    );
    t.insert(
        "step".into(),
        (Dtype::I64, vec![1], 7i64.to_le_bytes().to_vec()),
    );
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join("in.safetensors");
    let meta = HashMap::from([("modelspec.title".to_string(), "tiny".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path).unwrap();
    (path, t)
}

fn spec(tensor: &str, granularity: Granularity) -> LayerSpec {
    LayerSpec {
        tensor: tensor.into(),
        granularity,
        rotate: None,
    }
}

fn opts(format: Format, layers: Vec<LayerSpec>) -> Options {
    Options {
        format,
        layers,
        metadata: vec![("vramkit.note".into(), "test".into())],
    }
}

fn run(src: &Path, dst: &Path, o: &Options) -> IoResult<Report> {
    let file = SafetensorsFile::open(src)?;
    write_file(&file, dst, o, false, &mut |_| true)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vramkit-partial"))
        .collect()
}

fn to_f32(d: Dtype, b: &[u8]) -> Vec<f32> {
    match d {
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => unreachable!(),
    }
}

#[test]
fn every_scheme_round_trips_through_the_kernels() {
    let cases = [
        (Format::Int8, Granularity::Channel, Some(256)),
        (Format::Int8, Granularity::Channel, None),
        (Format::Int8, Granularity::Group(32), None),
        (Format::Int8, Granularity::Tensor, None),
        (Format::Fp8E4m3fn, Granularity::Tensor, None),
        (Format::Fp8E5m2, Granularity::Tensor, None),
        (Format::Fp8E4m3fn, Granularity::Group(64), None),
    ];
    for (fmt, gran, rotate) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (src, tensors) = sample(dir.path());
        let dst = dir.path().join("out.safetensors");
        let mut layers = vec![LayerSpec {
            tensor: "blocks.0.attn.qkv.weight".into(),
            granularity: gran,
            rotate,
        }];
        if rotate.is_none() {
            layers.push(spec("blocks.0.mlp.weight", gran));
        }
        let report = run(&src, &dst, &opts(fmt, layers.clone())).unwrap();
        assert_eq!(report.layers.len(), layers.len());
        let bytes = std::fs::read(&dst).unwrap();
        assert_eq!(bytes.len() as u64, report.output_bytes);
        let out = SafeTensors::deserialize(&bytes).unwrap();
        // Copied tensors: byte for byte.
        for name in ["blocks.0.attn.qkv.bias", "norm.weight", "step"] {
            assert_eq!(
                out.tensor(name).unwrap().data(),
                &tensors[name].2[..],
                "{name}"
            );
        }
        for l in &layers {
            let (dtype, shape, raw) = &tensors[&l.tensor];
            let x = to_f32(*dtype, raw);
            let layer = l.tensor.strip_suffix(".weight").unwrap();
            let codes = out.tensor(&l.tensor).unwrap();
            let scales = out.tensor(&format!("{layer}.weight_scale")).unwrap();
            let marker = out.tensor(&format!("{layer}.comfy_quant")).unwrap();
            assert_eq!(codes.shape(), &shape[..]);
            assert_eq!(codes.dtype(), plan::code_dtype(fmt));
            let row = shape[1];
            let block = match gran {
                Granularity::Tensor => x.len(),
                Granularity::Channel => row,
                Granularity::Group(g) => g,
            };
            let want_scale_shape: Vec<usize> = match gran {
                Granularity::Tensor => vec![],
                Granularity::Channel => vec![shape[0], 1],
                Granularity::Group(g) => vec![shape[0], row / g],
            };
            assert_eq!(scales.shape(), &want_scale_shape[..]);
            let src_vals = match l.rotate {
                Some(g) => {
                    let mut r = vec![0f32; x.len()];
                    hadamard::rotate_groups(&x, g, &mut r).unwrap();
                    r
                }
                None => x.clone(),
            };
            let mut want_codes = vec![0u8; x.len()];
            let mut want_scales = vec![0f32; x.len() / block];
            quant::quantize(fmt, &src_vals, block, &mut want_codes, &mut want_scales).unwrap();
            // The file's values are bf16/f32 and the kernel read them the same way.
            assert_eq!(
                codes.data(),
                &want_codes[..],
                "{fmt:?} {gran:?} {}",
                l.tensor
            );
            let got_scales: Vec<f32> = to_f32(Dtype::F32, scales.data());
            assert_eq!(got_scales, want_scales);
            let m: serde_json::Value = serde_json::from_slice(marker.data()).unwrap();
            let native = matches!(
                (fmt, gran),
                (Format::Int8, Granularity::Tensor | Granularity::Channel)
                    | (_, Granularity::Tensor)
            );
            assert_eq!(m["format"] != "vramkit_block_scaled", native, "{m}");
            assert_eq!(m.get("convrot").is_some(), l.rotate.is_some());
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["modelspec.title"], "tiny");
        assert_eq!(meta["vramkit.note"], "test");
        let q: serde_json::Value = serde_json::from_str(&meta[QUANT_METADATA_KEY]).unwrap();
        assert!(q["layers"]["blocks.0.attn.qkv"]["format"].is_string());
        // Widest dtypes first: every tensor aligned for its dtype.
        let (n, m) = SafeTensors::read_metadata(&bytes).unwrap();
        for (name, info) in m.tensors() {
            let width = (info.dtype.bitsize() / 8).max(1);
            assert_eq!(
                (8 + n + info.data_offsets.0) % width,
                0,
                "{name} misaligned"
            );
        }
        assert!(leftovers(dir.path()).is_empty());
    }
}

#[test]
fn prefixed_layers_are_unprefixed_in_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let data = bf16_bytes(&values(64 * 64, 9));
    let views = vec![(
        "model.diffusion_model.a.weight".to_string(),
        TensorView::new(Dtype::BF16, vec![64, 64], &data).unwrap(),
    )];
    let src = dir.path().join("p.safetensors");
    safetensors::serialize_to_file(views, None, &src).unwrap();
    let dst = dir.path().join("q.safetensors");
    run(
        &src,
        &dst,
        &opts(
            Format::Fp8E4m3fn,
            vec![spec("model.diffusion_model.a.weight", Granularity::Tensor)],
        ),
    )
    .unwrap();
    let bytes = std::fs::read(&dst).unwrap();
    let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
    let q: serde_json::Value =
        serde_json::from_str(&m.metadata().as_ref().unwrap()[QUANT_METADATA_KEY]).unwrap();
    assert_eq!(q["layers"]["a"]["format"], "float8_e4m3fn");
    assert!(m.info("model.diffusion_model.a.comfy_quant").is_some());
}

#[test]
fn memory_source_writes_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tensors) = sample(dir.path());
    let o = opts(
        Format::Int8,
        vec![spec("blocks.0.attn.qkv.weight", Granularity::Group(64))],
    );
    run(&src, &dir.path().join("a.safetensors"), &o).unwrap();
    let file = SafetensorsFile::open(&src).unwrap();
    let list: Vec<_> = file
        .tensors()
        .iter()
        .map(|t| {
            let (d, s, b) = &tensors[&t.name];
            (t.name.clone(), *d, s.clone(), &b[..])
        })
        .collect();
    let mem = MemorySource::new(list, file.metadata().cloned()).unwrap();
    let b = dir.path().join("b.safetensors");
    write_file(&mem, &b, &o, false, &mut |_| true).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        std::fs::read(&b).unwrap()
    );
    let bad = MemorySource::new(vec![("x".into(), Dtype::F32, vec![3], &[0u8; 8][..])], None);
    assert!(matches!(bad, Err(IoError::Invalid(m)) if m.contains("8 bytes")));
}

#[test]
fn progress_reports_every_byte_and_can_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = sample(dir.path());
    let file = SafetensorsFile::open(&src).unwrap();
    let o = opts(
        Format::Int8,
        vec![spec("blocks.0.attn.qkv.weight", Granularity::Channel)],
    );
    let mut last = (0, 0, 0, 0);
    let dst = dir.path().join("o.safetensors");
    write_file(&file, &dst, &o, false, &mut |p| {
        assert!(p.bytes_done >= last.2);
        last = (p.tensors_done, p.tensors_total, p.bytes_done, p.bytes_total);
        true
    })
    .unwrap();
    assert_eq!(last.0, last.1);
    assert_eq!(last.2, last.3);
    let dst2 = dir.path().join("cancelled.safetensors");
    let mut calls = 0;
    let err = write_file(&file, &dst2, &o, false, &mut |_| {
        calls += 1;
        calls < 3
    })
    .unwrap_err();
    assert!(matches!(err, IoError::Cancelled));
    assert!(!dst2.exists());
    assert!(leftovers(dir.path()).is_empty());
}

struct FailAfter {
    inner: std::fs::File,
    left: u64,
}

impl Sink for FailAfter {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.left -= buf.len() as u64;
        std::os::unix::fs::FileExt::write_all_at(&self.inner, buf, offset)
    }
}

#[test]
fn a_failing_write_leaves_nothing_and_the_input_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = sample(dir.path());
    let before = std::fs::read(&src).unwrap();
    let file = SafetensorsFile::open(&src).unwrap();
    let o = opts(
        Format::Int8,
        vec![spec("blocks.0.attn.qkv.weight", Granularity::Channel)],
    );
    let dst = dir.path().join("full.safetensors");
    for budget in [0u64, 100, 5000, 20000] {
        let err = write_file_with(&file, &dst, &o, false, &mut |_| true, &mut |f| {
            Box::new(FailAfter {
                inner: f,
                left: budget,
            })
        })
        .unwrap_err();
        match err {
            IoError::Os { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENOSPC)),
            other => panic!("{other}"),
        }
        assert!(!dst.exists());
        assert!(leftovers(dir.path()).is_empty());
    }
    assert_eq!(std::fs::read(&src).unwrap(), before);
}

#[test]
fn refusals_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = sample(dir.path());
    let good = opts(
        Format::Int8,
        vec![spec("blocks.0.attn.qkv.weight", Granularity::Channel)],
    );
    let msg = |r: IoResult<Report>| r.unwrap_err().to_string();
    // Output == input, directly, through "..", and through a hard link.
    assert!(msg(run(&src, &src, &good)).contains("is the input"));
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert!(msg(run(&src, &sub.join("../in.safetensors"), &good)).contains("is the input"));
    let link = dir.path().join("link.safetensors");
    std::fs::hard_link(&src, &link).unwrap();
    let file = SafetensorsFile::open(&src).unwrap();
    let e = write_file(&file, &link, &good, true, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("is the input"), "{e}");
    // Missing folder, existing file, folder as output.
    let e = run(&src, &dir.path().join("nope/out.safetensors"), &good).unwrap_err();
    assert!(
        matches!(&e, IoError::Os { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    );
    std::fs::write(dir.path().join("exists.safetensors"), b"x").unwrap();
    let e = run(&src, &dir.path().join("exists.safetensors"), &good).unwrap_err();
    assert!(
        matches!(&e, IoError::Os { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
    );
    assert!(msg(run(&src, &sub, &good)).contains("folder"));
    // Bad layer specs.
    let out = dir.path().join("o.safetensors");
    let cases = [
        (
            spec("missing.weight", Granularity::Channel),
            "no tensor named",
        ),
        (spec("step", Granularity::Tensor), "<layer>.weight"),
        (
            spec("blocks.0.attn.qkv.bias", Granularity::Tensor),
            "<layer>.weight",
        ),
        (
            spec("norm.weight", Granularity::Channel),
            "at least 2 dimensions",
        ),
        (
            spec("blocks.0.attn.qkv.weight", Granularity::Group(100)),
            "does not divide",
        ),
        (
            LayerSpec {
                tensor: "blocks.0.mlp.weight".into(),
                granularity: Granularity::Channel,
                rotate: Some(256),
            },
            "does not divide the row length 64",
        ),
        (
            LayerSpec {
                tensor: "blocks.0.attn.qkv.weight".into(),
                granularity: Granularity::Group(64),
                rotate: Some(256),
            },
            "per-channel",
        ),
    ];
    for (s, want) in cases {
        let e = msg(run(&src, &out, &opts(Format::Int8, vec![s.clone()])));
        assert!(e.contains(want), "{s:?}: {e}");
    }
    let twice = opts(
        Format::Int8,
        vec![
            spec("blocks.0.mlp.weight", Granularity::Channel),
            spec("blocks.0.mlp.weight", Granularity::Tensor),
        ],
    );
    assert!(msg(run(&src, &out, &twice)).contains("twice"));
    // A quantized file cannot be quantized again: it has the scale and marker tensors.
    run(&src, &out, &good).unwrap();
    let again = dir.path().join("again.safetensors");
    let e = msg(run(&out, &again, &good));
    assert!(e.contains("I8") || e.contains("already"), "{e}");
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn nan_is_an_error_naming_tensor_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = values(128 * 64, 5);
    v[5000] = f32::NAN;
    let data = bf16_bytes(&v);
    let src = dir.path().join("nan.safetensors");
    safetensors::serialize_to_file(
        vec![(
            "l.weight",
            TensorView::new(Dtype::BF16, vec![128, 64], &data).unwrap(),
        )],
        None,
        &src,
    )
    .unwrap();
    for g in [
        Granularity::Tensor,
        Granularity::Channel,
        Granularity::Group(32),
    ] {
        let e = run(
            &src,
            &dir.path().join("o.safetensors"),
            &opts(Format::Int8, vec![spec("l.weight", g)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("l.weight") && e.contains("index 5000"),
            "{g:?}: {e}"
        );
    }
    assert!(leftovers(dir.path()).is_empty());
}

/// A valid file's bytes, for the corpus and the fuzzer.
fn valid_bytes() -> Vec<u8> {
    let a = bf16_bytes(&values(8 * 16, 1));
    let b = bf16_bytes(&values(16, 2));
    safetensors::serialize(
        vec![
            (
                "a.weight",
                TensorView::new(Dtype::BF16, vec![8, 16], &a).unwrap(),
            ),
            (
                "a.bias",
                TensorView::new(Dtype::BF16, vec![16], &b).unwrap(),
            ),
        ],
        None,
    )
    .unwrap()
}

fn with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

/// Opens `bytes` as a file; Ok(number of tensors) or the error text. Also tries to quantize what opened.
fn open_bytes(bytes: &[u8]) -> Result<usize, String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let f = SafetensorsFile::open(&p).map_err(|e| e.to_string())?;
    let layers: Vec<LayerSpec> = f
        .tensors()
        .iter()
        .filter(|t| {
            t.name.ends_with(".weight") && t.shape.len() == 2 && plan::is_float_source(t.dtype)
        })
        .map(|t| spec(&t.name, Granularity::Channel))
        .collect();
    let _ = write_file(
        &f,
        &dir.path().join("o.safetensors"),
        &opts(Format::Int8, layers),
        false,
        &mut |_| true,
    );
    Ok(f.tensors().len())
}

#[test]
fn bad_headers_get_clear_errors() {
    let good = valid_bytes();
    assert_eq!(open_bytes(&good), Ok(2));
    let e = |b: &[u8]| open_bytes(b).unwrap_err();
    assert!(e(&good[..5]).contains("8-byte header length"));
    assert!(e(&good[..good.len() - 3]).contains("truncated: 3 bytes missing"));
    let mut extra = good.clone();
    extra.extend_from_slice(b"junk");
    assert!(e(&extra).contains("4 unexplained bytes"));
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(e(&huge).contains("more than the 100 MB"));
    let mut long = good.clone();
    long[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    assert!(e(&long).contains("only"));
    let overlap = with_header(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    assert!(e(&overlap).contains("overlap"), "{}", e(&overlap));
    let gap = with_header(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
        20,
    );
    assert!(e(&gap).contains("belong to no tensor"), "{}", e(&gap));
    let lying = with_header(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
        12,
    );
    assert!(e(&lying).contains("needs 16 bytes"), "{}", e(&lying));
    let dtype = with_header(
        r#"{"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,4]}}"#,
        4,
    );
    assert!(e(&dtype).contains("dtype"), "{}", e(&dtype));
    let json = with_header(r#"{"a":{"dtype":"F32""#, 0);
    assert!(e(&json).contains("JSON"), "{}", e(&json));
    let utf8 = with_header("\u{0}\u{0}", 0);
    assert!(!e(&utf8).is_empty());
    let mut bad_utf8 = (2u64).to_le_bytes().to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert!(e(&bad_utf8).contains("UTF-8"));
}

/// Every file of the committed corpus is refused with the text its `expected.json` entry names.
#[test]
fn corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/safetensors_corpus");
    let expected: HashMap<String, String> =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    assert!(expected.len() >= 8);
    for (name, want) in expected {
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let got = open_bytes(&bytes);
        match got {
            Err(text) => assert!(text.contains(&want), "{name}: {text:?} lacks {want:?}"),
            Ok(n) => assert!(
                want == "OK",
                "{name}: opened ({n} tensors), expected {want:?}"
            ),
        }
    }
}

/// Writes the corpus (run with `cargo test write_corpus -- --ignored` after changing it).
#[test]
#[ignore]
fn write_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/safetensors_corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let good = valid_bytes();
    let mut files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("valid.safetensors", good.clone(), "OK"),
        ("empty.safetensors", vec![], "8-byte header length"),
        (
            "truncated_data.safetensors",
            good[..good.len() - 10].to_vec(),
            "truncated: 10 bytes missing",
        ),
        (
            "truncated_header.safetensors",
            good[..20].to_vec(),
            "only 12 bytes follow",
        ),
        (
            "trailing_junk.safetensors",
            [good.clone(), b"junk".to_vec()].concat(),
            "unexplained bytes",
        ),
    ];
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    files.push((
        "huge_header_length.safetensors",
        huge,
        "header length field",
    ));
    let overlap = with_header(
        r#"{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#,
        24,
    );
    files.push(("overlapping_tensors.safetensors", overlap, "overlap"));
    let lying = with_header(
        r#"{"a.weight":{"dtype":"BF16","shape":[64,64],"data_offsets":[0,64]}}"#,
        64,
    );
    files.push(("lying_size.safetensors", lying, "needs 8192 bytes"));
    let beyond = with_header(
        r#"{"a.weight":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#,
        16,
    );
    files.push(("offsets_beyond_file.safetensors", beyond, "truncated"));
    let dtype = with_header(
        r#"{"a.weight":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,4]}}"#,
        4,
    );
    files.push((
        "bad_dtype.safetensors",
        dtype,
        "dtype safetensors does not know",
    ));
    let overflow = with_header(
        r#"{"a.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
        4,
    );
    files.push(("shape_overflow.safetensors", overflow, "overflows"));
    let meta = with_header(r#"{"__metadata__":{"a":1}}"#, 0);
    files.push(("metadata_not_strings.safetensors", meta, "JSON"));
    let mut expected = serde_json::Map::new();
    for (name, bytes, want) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
        expected.insert(name.into(), want.into());
    }
    std::fs::write(
        dir.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    /// Random byte edits anywhere in the file (header length, JSON, data): never a panic.
    #[test]
    fn mutated_files_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                 cut in any::<usize>(), truncate in any::<bool>()) {
        let mut b = valid_bytes();
        for (pos, v) in edits {
            let i = pos % b.len();
            b[i] = v;
        }
        if truncate {
            b.truncate(cut % (b.len() + 1));
        }
        let _ = open_bytes(&b);
    }

    /// Structured header lies: random dtypes, shapes and offsets in well-formed JSON: never a panic, and
    /// whatever opens is self-consistent.
    #[test]
    fn lying_headers_never_panic(
        entries in prop::collection::vec(
            (0usize..4, prop::sample::select(vec!["F32", "BF16", "F16", "I8", "U8", "I64", "F8_E4M3", "BOOL", "F4", "XX"]),
             prop::collection::vec(0usize..70, 0..4), 0usize..300, 0usize..300),
            1..5),
        data_len in 0usize..400,
    ) {
        let body: Vec<String> = entries
            .iter()
            .map(|(i, d, s, a, b)| format!(
                r#""t{i}.weight":{{"dtype":"{d}","shape":{s:?},"data_offsets":[{a},{b}]}}"#))
            .collect();
        let header = format!("{{{}}}", body.join(","));
        if let Ok(n) = open_bytes(&with_header(&header, data_len)) {
            prop_assert!(n <= entries.len());
        }
    }
}

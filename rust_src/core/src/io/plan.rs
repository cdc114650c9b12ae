//! The layout of a quantized file, decided before a byte of data is written: which tensors are quantized
//! how, every output tensor's dtype, shape and offsets, the markers, and the header (serialized by the
//! `safetensors` crate's `Metadata`).
//!
//! A quantized layer `<layer>.weight` becomes three tensors:
//! - `<layer>.weight`: the codes (`F8_E4M3`, `F8_E5M2` or `I8`), in the weight's shape;
//! - `<layer>.weight_scale`: float32 scales: shape `[]` per tensor, `[out, 1]` per output channel (row),
//!   `[out, row / group_size]` per group (`row` = the product of the dims after the first);
//! - `<layer>.comfy_quant`: a uint8 tensor holding the layer's marker, UTF-8 JSON.
//!
//! ComfyUI's own markers where ComfyUI has the scheme (stock ComfyUI loads these files):
//! fp8 per tensor `{"format": "float8_e4m3fn"}` / `{"format": "float8_e5m2"}`; int8 per tensor or per row
//! `{"format": "int8_tensorwise"}`, with `"convrot": true, "convrot_groupsize": g` when rotated. Every other
//! scheme (per-group INT8, fp8 per row or group) gets VRAMKit's marker, read only by VRAMKit's loader:
//! `{"format": "vramkit_block_scaled", "codes": "int8" | "fp8_e4m3fn" | "fp8_e5m2", "granularity":
//! "channel" | "group", "group_size": N (group only), "version": 1}`; dequantized value =
//! `decode(code) * scale` in float32, each scale covering `row / scale.shape[1]` consecutive elements of a row.
//!
//! The header's `__metadata__` keeps the input's entries and gains `_quantization_metadata`
//! (`{"format_version": "1.0", "layers": {<layer>: <marker>}}`, layer names without the model prefix such as
//! `model.diffusion_model.`): ComfyUI 0.3.7x reads only that form, and ComfyUI 0.29+ turns it into the same
//! per-layer markers. A format a ComfyUI does not know then fails its load loudly instead of loading codes
//! as weights.
//!
//! Output tensors are ordered by dtype width (widest first), then name, as the crate's own serializer does,
//! so every tensor's data is aligned for its dtype. The header JSON has sorted keys: the same input and
//! options give the same file, byte for byte.

use super::error::{IoError, IoResult};
use super::file::TensorEntry;
use crate::quant::{hadamard, Format};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The header key (in `__metadata__`) of ComfyUI's header form of the per-layer markers.
pub const QUANT_METADATA_KEY: &str = "_quantization_metadata";
/// VRAMKit's own marker format name.
pub const VRAMKIT_FORMAT: &str = "vramkit_block_scaled";
/// Suffixes of the tensors a quantized layer adds next to `<layer>.weight`.
pub const SCALE_SUFFIX: &str = ".weight_scale";
pub const MARKER_SUFFIX: &str = ".comfy_quant";
const WEIGHT_SUFFIX: &str = ".weight";
/// Key prefixes ComfyUI strips before it builds a diffusion model (`unet_prefix_from_state_dict`).
const MODEL_PREFIXES: [&str; 3] = ["model.diffusion_model.", "model.model.", "net."];

/// How many weights share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Tensor,
    /// One scale per output channel (row = first dimension).
    Channel,
    /// One scale per `n` consecutive elements of a row.
    Group(usize),
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tensor => "tensor",
            Self::Channel => "channel",
            Self::Group(_) => "group",
        }
    }
}

/// One tensor to quantize.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// The weight's tensor name, `<layer>.weight`.
    pub tensor: String,
    pub granularity: Granularity,
    /// ConvRot group size (int8 per channel of a 2-D weight only), or None.
    pub rotate: Option<usize>,
}

/// What to write.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    pub layers: Vec<LayerSpec>,
    /// Extra `__metadata__` entries (added after the input's; `_quantization_metadata` is reserved).
    pub metadata: Vec<(String, String)>,
}

/// What happens to one input tensor.
#[derive(Debug, Clone)]
pub enum Item {
    /// Written as is into output tensor `out`.
    Copy {
        out: usize,
    },
    Quantize(QuantItem),
}

#[derive(Debug, Clone)]
pub struct QuantItem {
    pub spec: LayerSpec,
    /// Output indices of the codes, the scales and the marker.
    pub codes: usize,
    pub scales: usize,
    pub marker: usize,
    pub marker_bytes: Vec<u8>,
    /// Elements per scale.
    pub block_len: usize,
    /// Elements per row (after the first dimension).
    pub row_len: usize,
    pub native: bool,
}

/// An output tensor with its place in the data area.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// Per input tensor (same order as the source's `tensors()`).
    pub items: Vec<Item>,
    pub outputs: Vec<OutTensor>,
    /// The serialized header, padded to 8 bytes (without the 8-byte length field).
    pub header: Vec<u8>,
    pub data_len: usize,
}

impl Plan {
    pub fn file_len(&self) -> usize {
        super::file::HEADER_LEN_BYTES + self.header.len() + self.data_len
    }
}

/// Whether a dtype can be quantized.
pub fn is_float_source(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// The code dtype of a format.
pub fn code_dtype(fmt: Format) -> Dtype {
    match fmt {
        Format::Fp8E4m3fn => Dtype::F8_E4M3,
        Format::Fp8E5m2 => Dtype::F8_E5M2,
        Format::Int8 => Dtype::I8,
    }
}

/// The marker of a layer quantized as `spec` in `fmt`, and whether it is one of ComfyUI's formats.
pub fn marker(fmt: Format, spec: &LayerSpec) -> (Value, bool) {
    match (fmt, spec.granularity) {
        (Format::Fp8E4m3fn, Granularity::Tensor) => (json!({"format": "float8_e4m3fn"}), true),
        (Format::Fp8E5m2, Granularity::Tensor) => (json!({"format": "float8_e5m2"}), true),
        (Format::Int8, Granularity::Tensor | Granularity::Channel) => {
            let mut m = json!({"format": "int8_tensorwise"});
            if let Some(g) = spec.rotate {
                m["convrot"] = json!(true);
                m["convrot_groupsize"] = json!(g);
            }
            (m, true)
        }
        (_, g) => {
            let mut m = json!({
                "format": VRAMKIT_FORMAT,
                "codes": fmt.name(),
                "granularity": g.name(),
                "version": 1,
            });
            if let Granularity::Group(n) = g {
                m["group_size"] = json!(n);
            }
            (m, false)
        }
    }
}

/// The prefix ComfyUI strips from this file's keys before building the model ("" when none).
pub fn model_prefix<'a>(names: impl Iterator<Item = &'a str>) -> &'static str {
    let mut counts = [0usize; MODEL_PREFIXES.len()];
    for name in names {
        for (c, p) in counts.iter_mut().zip(MODEL_PREFIXES) {
            if name.starts_with(p) {
                *c += 1;
            }
        }
    }
    counts
        .iter()
        .zip(MODEL_PREFIXES)
        .filter(|(c, _)| **c > 0)
        .max_by_key(|(c, _)| **c)
        .map_or("", |(_, p)| p)
}

/// Validates `opts` against the input tensors and lays out the output.
pub fn plan(
    tensors: &[TensorEntry],
    input_metadata: Option<&HashMap<String, String>>,
    opts: &Options,
) -> IoResult<Plan> {
    let by_name: HashMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    if by_name.contains_key("scaled_fp8") || tensors.iter().any(|t| t.name.ends_with(".scaled_fp8"))
    {
        return Err(IoError::Invalid(
            "the input uses ComfyUI's legacy scaled_fp8 marker (it is quantized already); quantize the \
             original high-precision file instead"
                .into(),
        ));
    }
    let mut specs: HashMap<usize, &LayerSpec> = HashMap::new();
    for spec in &opts.layers {
        let &i = by_name.get(spec.tensor.as_str()).ok_or_else(|| {
            IoError::Invalid(format!("no tensor named {:?} in the input", spec.tensor))
        })?;
        if specs.insert(i, spec).is_some() {
            return Err(IoError::Invalid(format!(
                "tensor {:?} is listed twice",
                spec.tensor
            )));
        }
        check_spec(opts.format, spec, &tensors[i], &by_name)?;
    }

    let prefix = model_prefix(tensors.iter().map(|t| t.name.as_str()));
    let mut outputs: Vec<OutTensor> = Vec::with_capacity(tensors.len() + 2 * specs.len());
    let mut items = Vec::with_capacity(tensors.len());
    let mut layers = Map::new();
    let push = |outputs: &mut Vec<OutTensor>, name: String, dtype: Dtype, shape: Vec<usize>| {
        outputs.push(OutTensor {
            name,
            dtype,
            shape,
            start: 0,
            end: 0,
        });
        outputs.len() - 1
    };
    for (i, t) in tensors.iter().enumerate() {
        let Some(spec) = specs.get(&i) else {
            let out = push(&mut outputs, t.name.clone(), t.dtype, t.shape.clone());
            items.push(Item::Copy { out });
            continue;
        };
        let layer = &t.name[..t.name.len() - WEIGHT_SUFFIX.len()];
        let rows = t.shape.first().copied().unwrap_or(1);
        let numel = t.numel();
        let row_len = numel / rows.max(1);
        let (block_len, scale_shape) = match spec.granularity {
            Granularity::Tensor => (numel, vec![]),
            Granularity::Channel => (row_len, vec![rows, 1]),
            Granularity::Group(g) => (g, vec![rows, row_len / g]),
        };
        let (mark, native) = marker(opts.format, spec);
        let marker_bytes = serde_json::to_vec(&mark)
            .map_err(|e| IoError::Invalid(format!("cannot serialize a marker: {e}")))?;
        let header_layer = layer.strip_prefix(prefix).unwrap_or(layer);
        layers.insert(header_layer.to_string(), mark);
        let codes = push(
            &mut outputs,
            t.name.clone(),
            code_dtype(opts.format),
            t.shape.clone(),
        );
        let scales = push(
            &mut outputs,
            format!("{layer}{SCALE_SUFFIX}"),
            Dtype::F32,
            scale_shape,
        );
        let marker = push(
            &mut outputs,
            format!("{layer}{MARKER_SUFFIX}"),
            Dtype::U8,
            vec![marker_bytes.len()],
        );
        items.push(Item::Quantize(QuantItem {
            spec: (*spec).clone(),
            codes,
            scales,
            marker,
            marker_bytes,
            block_len,
            row_len,
            native,
        }));
    }

    // Widest dtype first, then by name (the crate's own order): every tensor stays aligned.
    let mut order: Vec<usize> = (0..outputs.len()).collect();
    order.sort_by(|&a, &b| {
        outputs[b]
            .dtype
            .cmp(&outputs[a].dtype)
            .then_with(|| outputs[a].name.cmp(&outputs[b].name))
    });
    let mut pos = 0usize;
    let mut infos = Vec::with_capacity(outputs.len());
    for &o in &order {
        let out = &mut outputs[o];
        let bytes = out.shape.iter().product::<usize>() * out.dtype.bitsize() / 8;
        out.start = pos;
        out.end = pos + bytes;
        pos += bytes;
        infos.push((
            out.name.clone(),
            TensorInfo {
                dtype: out.dtype,
                shape: out.shape.clone(),
                data_offsets: (out.start, out.end),
            },
        ));
    }

    let metadata = output_metadata(input_metadata, &opts.metadata, layers)?;
    // The crate validates the layout; the JSON is written with sorted keys (serde_json's map) so the same
    // input and options always give the same bytes (the crate's own serializer iterates a HashMap).
    let mut doc = Map::new();
    if let Some(m) = &metadata {
        let sorted: BTreeMap<&String, &String> = m.iter().collect();
        doc.insert("__metadata__".into(), json!(sorted));
    }
    for (name, info) in &infos {
        let v = serde_json::to_value(info)
            .map_err(|e| IoError::Invalid(format!("cannot serialize the header: {e}")))?;
        doc.insert(name.clone(), v);
    }
    Metadata::new(metadata, infos)
        .map_err(|e| IoError::Invalid(format!("the planned header is not valid: {e}")))?;
    let mut header = serde_json::to_vec(&Value::Object(doc))
        .map_err(|e| IoError::Invalid(format!("cannot serialize the header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(Plan {
        items,
        outputs,
        header,
        data_len: pos,
    })
}

fn check_spec(
    fmt: Format,
    spec: &LayerSpec,
    t: &TensorEntry,
    by_name: &HashMap<&str, usize>,
) -> IoResult<()> {
    let bad = |why: String| Err(IoError::Invalid(format!("tensor {:?}: {why}", t.name)));
    let Some(layer) = t.name.strip_suffix(WEIGHT_SUFFIX).filter(|l| !l.is_empty()) else {
        return bad(
            "only tensors named <layer>.weight can be quantized (ComfyUI keys the scale and \
                    the marker by the layer)"
                .into(),
        );
    };
    if !is_float_source(t.dtype) {
        return bad(format!(
            "it is {}; only F32, F16 and BF16 tensors can be quantized",
            t.dtype
        ));
    }
    for suffix in [SCALE_SUFFIX, MARKER_SUFFIX] {
        if by_name.contains_key(format!("{layer}{suffix}").as_str()) {
            return bad(format!(
                "the input already has {layer}{suffix} (is it quantized already?)"
            ));
        }
    }
    let numel = t.numel();
    if numel == 0 {
        return bad(format!("it is empty (shape {:?})", t.shape));
    }
    let needs_rows = !matches!(spec.granularity, Granularity::Tensor);
    if needs_rows && t.shape.len() < 2 {
        return bad(format!(
            "granularity {:?} needs at least 2 dimensions (dim 0 is the output channel); the shape is {:?}",
            spec.granularity.name(),
            t.shape
        ));
    }
    let row_len = numel / t.shape.first().copied().unwrap_or(1).max(1);
    if let Granularity::Group(g) = spec.granularity {
        if g == 0 || !row_len.is_multiple_of(g) {
            return bad(format!(
                "group size {g} does not divide the row length {row_len} (shape {:?}); pick a divisor \
                 or use granularity \"channel\"",
                t.shape
            ));
        }
    }
    if let Some(g) = spec.rotate {
        if fmt != Format::Int8 || spec.granularity != Granularity::Channel || t.shape.len() != 2 {
            return bad(
                "ConvRot rotation applies to int8 per-channel (per-row) 2-D weights only".into(),
            );
        }
        hadamard::check_group(g, row_len).map_err(|source| IoError::Tensor {
            tensor: t.name.clone(),
            source,
        })?;
    }
    Ok(())
}

fn output_metadata(
    input: Option<&HashMap<String, String>>,
    extra: &[(String, String)],
    layers: Map<String, Value>,
) -> IoResult<Option<HashMap<String, String>>> {
    let mut meta = input.cloned().unwrap_or_default();
    let mut seen = HashSet::new();
    for (k, v) in extra {
        if k == QUANT_METADATA_KEY {
            return Err(IoError::Invalid(format!(
                "metadata key {QUANT_METADATA_KEY:?} is written by the quantizer itself"
            )));
        }
        if !seen.insert(k) {
            return Err(IoError::Invalid(format!(
                "metadata key {k:?} is given twice"
            )));
        }
        meta.insert(k.clone(), v.clone());
    }
    if !layers.is_empty() {
        let mut all = Map::new();
        if let Some(existing) = meta.get(QUANT_METADATA_KEY) {
            let parsed: Value = serde_json::from_str(existing).map_err(|e| {
                IoError::Invalid(format!(
                    "the input's {QUANT_METADATA_KEY} is not valid JSON ({e})"
                ))
            })?;
            if let Some(Value::Object(old)) = parsed.get("layers") {
                all.extend(old.clone());
            }
        }
        all.extend(layers);
        let doc = json!({"format_version": "1.0", "layers": Value::Object(all)});
        meta.insert(QUANT_METADATA_KEY.to_string(), doc.to_string());
    }
    Ok(if meta.is_empty() { None } else { Some(meta) })
}

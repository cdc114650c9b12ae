//! Python bindings of the fit planner (`vramkit_core::plan::ladder`): dicts in, a dict out. Every field error is a
//! ValueError naming the field (`device['h2d_gbps']`), unknown keys included (a typo is not ignored).

use super::{guard, to_py_err};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList};
use vramkit_core::plan::builtin;
use vramkit_core::plan::cost::{AttentionMode, Evaluation};
use vramkit_core::plan::ladder::{plan_fit as plan, Plan, Preset};
use vramkit_core::plan::profile::{
    Arch, Block, Component, DeviceProfile, Estimate, Family, Format, FormatBytes, Job,
    MemoryManager, ModelProfile, Os,
};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_fit, m)?)?;
    m.add_function(wrap_pyfunction!(builtin_profiles, m)?)?;
    Ok(())
}

/// A dict being read, with the path used in error messages.
struct Fields<'a, 'py> {
    dict: &'a Bound<'py, PyDict>,
    path: String,
}

fn bad(path: &str, key: &str, what: &str, got: &Bound<'_, PyAny>) -> PyErr {
    let shown = got
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    let shown: String = shown.chars().take(60).collect();
    PyValueError::new_err(format!("{path}['{key}'] must be {what}; got {shown}"))
}

impl<'a, 'py> Fields<'a, 'py> {
    fn new(
        dict: &'a Bound<'py, PyDict>,
        path: impl Into<String>,
        known: &[&str],
    ) -> PyResult<Self> {
        let path = path.into();
        for key in dict.keys() {
            let name: String = key
                .extract()
                .map_err(|_| PyValueError::new_err(format!("{path} keys must be strings")))?;
            if !known.contains(&name.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "{path} has an unknown key {name:?}; accepted: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(Fields { dict, path })
    }

    fn get(&self, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(self.dict.get_item(key)?.filter(|v| !v.is_none()))
    }

    fn required(&self, key: &str) -> PyResult<Bound<'py, PyAny>> {
        self.get(key)?
            .ok_or_else(|| PyValueError::new_err(format!("{} is missing '{key}'", self.path)))
    }

    fn int_of(&self, key: &str, v: &Bound<'py, PyAny>) -> PyResult<u64> {
        if v.is_instance_of::<PyBool>() {
            return Err(bad(&self.path, key, "a non-negative int", v));
        }
        v.extract::<u64>()
            .map_err(|_| bad(&self.path, key, "a non-negative int", v))
    }

    fn int(&self, key: &str) -> PyResult<u64> {
        let v = self.required(key)?;
        self.int_of(key, &v)
    }

    fn int_or(&self, key: &str, default: u64) -> PyResult<u64> {
        match self.get(key)? {
            Some(v) => self.int_of(key, &v),
            None => Ok(default),
        }
    }

    fn float_of(&self, key: &str, v: &Bound<'py, PyAny>) -> PyResult<f64> {
        if v.is_instance_of::<PyBool>() {
            return Err(bad(&self.path, key, "a number", v));
        }
        let x = v
            .extract::<f64>()
            .map_err(|_| bad(&self.path, key, "a number", v))?;
        if !x.is_finite() {
            return Err(bad(&self.path, key, "a finite number", v));
        }
        Ok(x)
    }

    fn float(&self, key: &str) -> PyResult<f64> {
        let v = self.required(key)?;
        self.float_of(key, &v)
    }

    fn float_or(&self, key: &str, default: f64) -> PyResult<f64> {
        match self.get(key)? {
            Some(v) => self.float_of(key, &v),
            None => Ok(default),
        }
    }

    fn bool_opt(&self, key: &str) -> PyResult<Option<bool>> {
        match self.get(key)? {
            Some(v) if v.is_instance_of::<PyBool>() => Ok(Some(v.extract()?)),
            Some(v) => Err(bad(&self.path, key, "a bool", &v)),
            None => Ok(None),
        }
    }

    fn string_of(&self, key: &str, v: &Bound<'py, PyAny>) -> PyResult<String> {
        v.extract::<String>()
            .map_err(|_| bad(&self.path, key, "a string", v))
    }

    fn string(&self, key: &str) -> PyResult<String> {
        let v = self.required(key)?;
        self.string_of(key, &v)
    }

    fn string_or(&self, key: &str, default: &str) -> PyResult<String> {
        match self.get(key)? {
            Some(v) => self.string_of(key, &v),
            None => Ok(default.to_string()),
        }
    }

    fn dict(&self, key: &str, v: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        v.cast::<PyDict>()
            .cloned()
            .map_err(|_| bad(&self.path, key, "a dict", v))
    }

    fn list(&self, key: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
        match self.get(key)? {
            None => Ok(Vec::new()),
            Some(v) => {
                let list = v
                    .cast::<PyList>()
                    .map_err(|_| bad(&self.path, key, "a list", &v))?;
                Ok(list.iter().collect())
            }
        }
    }

    fn field(&self, key: &str) -> String {
        format!("{}['{key}']", self.path)
    }
}

fn value<T>(r: vramkit_core::error::CoreResult<T>) -> PyResult<T> {
    r.map_err(to_py_err)
}

const MODEL_KEYS: &[&str] = &[
    "name",
    "description",
    "weights_format",
    "blocks",
    "text_encoders",
    "vae",
    "family",
    "memory_usage_factor",
    "latent_channels",
    "latent_spatial",
    "latent_temporal",
    "patch",
    "joint_text_tokens",
    "hidden",
    "widest",
    "activation_factor",
    "heads",
    "attention_layers",
    "flops_per_token",
    "cfg",
    "vae_decode_bytes_per_pixel",
    "vae_decode_frames",
    "comfy_vae_decode_per_latent",
];

fn component(parent: &Fields<'_, '_>, key: &str, v: &Bound<'_, PyAny>) -> PyResult<Component> {
    let d = parent.dict(key, v)?;
    let f = Fields::new(&d, parent.field(key), &["name", "bytes"])?;
    Ok(Component {
        name: f.string("name")?,
        bytes: f.int("bytes")?,
    })
}

fn parse_model(obj: &Bound<'_, PyDict>) -> PyResult<ModelProfile> {
    let f = Fields::new(obj, "model_profile", MODEL_KEYS)?;
    let mut blocks = Vec::new();
    for (i, b) in f.list("blocks")?.iter().enumerate() {
        let key = format!("blocks'][{i}");
        let d = f.dict(&key, b)?;
        let bf = Fields::new(
            &d,
            format!("model_profile['blocks'][{i}]"),
            &["name", "bytes", "largest_layer_params"],
        )?;
        let bytes = bf.required("bytes")?;
        let bytes = bf.dict("bytes", &bytes)?;
        let by = Fields::new(
            &bytes,
            bf.field("bytes"),
            &["fp32", "bf16", "fp16", "fp8", "int8"],
        )?;
        let bf16 = by.int("bf16")?;
        let format_bytes = FormatBytes {
            fp32: by.int_or("fp32", bf16.saturating_mul(2))?,
            bf16,
            fp16: by.int_or("fp16", bf16)?,
            fp8: by.int("fp8")?,
            int8: by.int("int8")?,
        };
        blocks.push(Block {
            name: bf.string("name")?,
            bytes: format_bytes,
            largest_layer_params: bf.int("largest_layer_params")?,
        });
    }
    let mut text_encoders = Vec::new();
    for (i, c) in f.list("text_encoders")?.iter().enumerate() {
        text_encoders.push(component(&f, &format!("text_encoders'][{i}"), c)?);
    }
    let vae = match f.get("vae")? {
        Some(v) => Some(component(&f, "vae", &v)?),
        None => None,
    };
    let arch = Arch {
        family: value(Family::parse(&f.string("family")?))?,
        memory_usage_factor: f.float("memory_usage_factor")?,
        latent_channels: f.int("latent_channels")?,
        latent_spatial: f.int("latent_spatial")?,
        latent_temporal: f.int_or("latent_temporal", 1)?,
        patch: f.int("patch")?,
        joint_text_tokens: f.int_or("joint_text_tokens", 0)?,
        hidden: f.int("hidden")?,
        widest: f.int("widest")?,
        activation_factor: f.float_or("activation_factor", 3.0)?,
        heads: f.int("heads")?,
        attention_layers: f.int("attention_layers")?,
        flops_per_token: f.float_or("flops_per_token", 0.0)?,
        cfg: f.bool_opt("cfg")?.unwrap_or(true),
        vae_decode_bytes_per_pixel: f.int_or("vae_decode_bytes_per_pixel", 1024)?,
        vae_decode_frames: f.int_or("vae_decode_frames", 1)?,
        comfy_vae_decode_per_latent: f.int_or("comfy_vae_decode_per_latent", 2178 * 64)?,
    };
    let format_name = f.string_or("weights_format", "bf16")?;
    let model = ModelProfile {
        name: f.string("name")?,
        weights_format: value(Format::parse(&f.field("weights_format"), &format_name))?,
        blocks,
        text_encoders,
        vae,
        arch,
    };
    value(model.validate())?;
    Ok(model)
}

const DEVICE_KEYS: &[&str] = &[
    "name",
    "total_bytes",
    "free_bytes",
    "compute_capability",
    "bf16",
    "fp8_matmul",
    "int8_matmul",
    "efficient_attention",
    "h2d_gbps",
    "memory_gbps",
    "tflops",
    "ram_bytes",
    "os",
    "memory_manager",
    "streams",
    "extra_reserved_bytes",
    "minimum_inference_bytes",
];

fn parse_device(obj: &Bound<'_, PyDict>) -> PyResult<DeviceProfile> {
    let f = Fields::new(obj, "device", DEVICE_KEYS)?;
    let reference = DeviceProfile::reference(0);
    let cc = match f.get("compute_capability")? {
        None => None,
        Some(v) => {
            let pair: (u32, u32) = v.extract().map_err(|_| {
                bad(
                    "device",
                    "compute_capability",
                    "a (major, minor) pair of ints or None",
                    &v,
                )
            })?;
            Some(pair)
        }
    };
    let (bf16, fp8, int8) = DeviceProfile::capabilities(cc);
    let device = DeviceProfile {
        name: f.string_or("name", "cuda")?,
        total_bytes: f.int("total_bytes")?,
        free_bytes: f.int_or("free_bytes", 0)?,
        compute_capability: cc,
        bf16: f.bool_opt("bf16")?.unwrap_or(bf16),
        fp8_matmul: f.bool_opt("fp8_matmul")?.unwrap_or(fp8),
        int8_matmul: f.bool_opt("int8_matmul")?.unwrap_or(int8),
        efficient_attention: f.bool_opt("efficient_attention")?.unwrap_or(true),
        h2d_gbps: f.float_or("h2d_gbps", reference.h2d_gbps)?,
        memory_gbps: f.float_or("memory_gbps", reference.memory_gbps)?,
        tflops: f.float_or("tflops", reference.tflops)?,
        ram_bytes: f.int_or("ram_bytes", 0)?,
        os: value(Os::parse(&f.string_or("os", "linux")?))?,
        memory_manager: value(MemoryManager::parse(
            &f.string_or("memory_manager", "dynamic")?,
        ))?,
        streams: f.int_or("streams", 2)?,
        extra_reserved_bytes: f
            .get("extra_reserved_bytes")?
            .map(|v| f.int_of("extra_reserved_bytes", &v))
            .transpose()?,
        minimum_inference_bytes: f
            .get("minimum_inference_bytes")?
            .map(|v| f.int_of("minimum_inference_bytes", &v))
            .transpose()?,
    };
    value(device.validate())?;
    Ok(device)
}

const JOB_KEYS: &[&str] = &[
    "width",
    "height",
    "frames",
    "batch",
    "cfg",
    "estimate",
    "activation_scale",
    "time_scale",
];

fn parse_job(obj: &Bound<'_, PyDict>) -> PyResult<Job> {
    let f = Fields::new(obj, "job", JOB_KEYS)?;
    Ok(Job {
        width: f.int("width")?,
        height: f.int("height")?,
        frames: f.int_or("frames", 1)?,
        batch: f.int_or("batch", 1)?,
        cfg: f.bool_opt("cfg")?,
        estimate: value(Estimate::parse(
            &f.string_or("estimate", "first_principles")?,
        ))?,
        activation_scale: f.float_or("activation_scale", 1.0)?,
        time_scale: f.float_or("time_scale", 1.0)?,
    })
}

fn as_dict<'py>(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    obj.cast::<PyDict>().cloned().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a dict; got {}",
            super::arrays::describe(obj)
        ))
    })
}

/// Adds `config`, `activations`, `phases` and `time` of an evaluation to `out`.
fn add_evaluation<'py>(
    py: Python<'py>,
    out: &Bound<'py, PyDict>,
    e: &Evaluation,
    estimate: Estimate,
) -> PyResult<()> {
    let c = &e.config;
    let config = PyDict::new(py);
    let precision = if c.sixteen_bit && e.compute_bytes == 2 && !e.weights_format.is_8bit() {
        e.weights_format.name()
    } else {
        "keep"
    };
    config.set_item("precision", precision)?;
    let (attention, slices) = match c.attention {
        AttentionMode::Default => ("default", None),
        AttentionMode::Efficient => ("efficient", None),
        AttentionMode::Sliced(s) => ("sliced", Some(s)),
    };
    config.set_item("attention", attention)?;
    config.set_item("attention_slices", slices)?;
    config.set_item("offload_text_encoder", c.offload_text_encoder)?;
    config.set_item("offload_vae", c.offload_vae)?;
    config.set_item("eight_bit", c.eight_bit && e.weights_format.is_8bit())?;
    config.set_item("weights_format", e.weights_format.name())?;
    config.set_item(
        "resident_bytes",
        (e.streamed_bytes > 0).then_some(e.components.weights),
    )?;
    config.set_item("streamed_bytes", e.streamed_bytes)?;
    config.set_item("weights_bytes", e.weights_total)?;

    let a = &e.activations;
    let acts = PyDict::new(py);
    acts.set_item("comfy", a.comfy)?;
    acts.set_item("comfy_minimum", a.comfy_minimum)?;
    acts.set_item("comfy_dynamic", a.comfy_dynamic)?;
    acts.set_item("first_principles", a.first_principles)?;
    acts.set_item("used", estimate.name())?;
    acts.set_item("tokens", a.tokens)?;
    acts.set_item("batch", a.batch)?;

    let phases = PyDict::new(py);
    phases.set_item("sampling", e.peak)?;
    phases.set_item("text_encode", e.encode_peak)?;
    phases.set_item("text_encode_min", e.encode_min)?;
    phases.set_item("vae_decode", e.decode_peak)?;
    phases.set_item("vae_decode_min", e.decode_min)?;
    phases.set_item("comfy_vae_decode", e.comfy_decode)?;

    let time = PyDict::new(py);
    time.set_item("compute", e.time.compute)?;
    time.set_item("attention", e.time.attention)?;
    time.set_item("dequantize", e.time.dequantize)?;
    time.set_item("transfer", e.time.transfer)?;
    out.set_item("config", config)?;
    out.set_item("activations", acts)?;
    out.set_item("phases", phases)?;
    out.set_item("time", time)?;
    Ok(())
}

fn plan_dict<'py>(
    py: Python<'py>,
    p: &Plan,
    model: &str,
    device: &str,
    estimate: Estimate,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("fits", p.fits)?;
    let steps = PyList::empty(py);
    for s in &p.steps {
        let d = PyDict::new(py);
        d.set_item("rung", s.rung.name())?;
        d.set_item("action", &s.action)?;
        d.set_item("reason", &s.reason)?;
        steps.append(d)?;
    }
    out.set_item("steps", steps)?;
    out.set_item("predicted_peak_bytes", p.evaluation.peak)?;
    out.set_item("predicted_step_seconds", p.evaluation.time.total)?;
    let components = PyDict::new(py);
    for (name, v) in p.evaluation.components.named() {
        components.set_item(name, v)?;
    }
    out.set_item("components", components)?;
    add_evaluation(py, &out, &p.evaluation, estimate)?;
    out.set_item("preset", p.preset.name())?;
    out.set_item("budget_bytes", p.budget)?;
    out.set_item("requested_budget_bytes", p.requested_budget)?;
    out.set_item("min_budget_bytes", p.min_budget)?;
    out.set_item("ram_needed_bytes", p.evaluation.ram_needed)?;
    out.set_item("notes", p.notes.clone())?;
    out.set_item("suggestions", p.suggestions.clone())?;
    out.set_item("model", model)?;
    out.set_item("device", device)?;
    Ok(out)
}

/// Plans `job` for the model on the device within `budget_bytes` (0 = the device's free memory); see the
/// stub for the dict layouts. The search runs with the GIL released.
#[pyfunction]
#[pyo3(signature = (model_profile, device, job, budget_bytes, preset="auto"))]
fn plan_fit<'py>(
    py: Python<'py>,
    model_profile: &Bound<'py, PyAny>,
    device: &Bound<'py, PyAny>,
    job: &Bound<'py, PyAny>,
    budget_bytes: &Bound<'py, PyAny>,
    preset: &str,
) -> PyResult<Bound<'py, PyDict>> {
    guard("plan_fit", || {
        let model = parse_model(&as_dict("model_profile", model_profile)?)?;
        let device = parse_device(&as_dict("device", device)?)?;
        let job = parse_job(&as_dict("job", job)?)?;
        let budget = super::usize_arg("budget_bytes", budget_bytes, 0)? as u64;
        let preset = value(Preset::parse(preset))?;
        let estimate = job.estimate;
        let result = py.detach(|| plan(&model, &device, &job, budget, preset));
        let p = value(result)?;
        plan_dict(py, &p, &model.name, &device.name, estimate)
    })
}

fn model_dict<'py>(
    py: Python<'py>,
    m: &ModelProfile,
    description: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &m.name)?;
    d.set_item("description", description)?;
    d.set_item("weights_format", m.weights_format.name())?;
    let blocks = PyList::empty(py);
    for b in &m.blocks {
        let bd = PyDict::new(py);
        bd.set_item("name", &b.name)?;
        let by = PyDict::new(py);
        for f in Format::ALL {
            by.set_item(f.name(), b.bytes.get(f))?;
        }
        bd.set_item("bytes", by)?;
        bd.set_item("largest_layer_params", b.largest_layer_params)?;
        blocks.append(bd)?;
    }
    d.set_item("blocks", blocks)?;
    let tes = PyList::empty(py);
    for c in &m.text_encoders {
        let cd = PyDict::new(py);
        cd.set_item("name", &c.name)?;
        cd.set_item("bytes", c.bytes)?;
        tes.append(cd)?;
    }
    d.set_item("text_encoders", tes)?;
    match &m.vae {
        Some(v) => {
            let vd = PyDict::new(py);
            vd.set_item("name", &v.name)?;
            vd.set_item("bytes", v.bytes)?;
            d.set_item("vae", vd)?;
        }
        None => d.set_item("vae", py.None())?,
    }
    let a = &m.arch;
    d.set_item("family", a.family.name())?;
    d.set_item("memory_usage_factor", a.memory_usage_factor)?;
    d.set_item("latent_channels", a.latent_channels)?;
    d.set_item("latent_spatial", a.latent_spatial)?;
    d.set_item("latent_temporal", a.latent_temporal)?;
    d.set_item("patch", a.patch)?;
    d.set_item("joint_text_tokens", a.joint_text_tokens)?;
    d.set_item("hidden", a.hidden)?;
    d.set_item("widest", a.widest)?;
    d.set_item("activation_factor", a.activation_factor)?;
    d.set_item("heads", a.heads)?;
    d.set_item("attention_layers", a.attention_layers)?;
    d.set_item("flops_per_token", a.flops_per_token)?;
    d.set_item("cfg", a.cfg)?;
    d.set_item("vae_decode_bytes_per_pixel", a.vae_decode_bytes_per_pixel)?;
    d.set_item("vae_decode_frames", a.vae_decode_frames)?;
    d.set_item("comfy_vae_decode_per_latent", a.comfy_vae_decode_per_latent)?;
    Ok(d)
}

/// The built-in model profiles, in the same dict layout `plan_fit` takes, keyed by name.
#[pyfunction]
fn builtin_profiles(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    guard("builtin_profiles", || {
        let out = PyDict::new(py);
        for ((name, description), m) in builtin::names().into_iter().zip(builtin::profiles()) {
            out.set_item(name, model_dict(py, &m, description)?)?;
        }
        Ok(out)
    })
}

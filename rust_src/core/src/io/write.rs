//! The streaming writer: reads the source tensor by tensor (large ones in chunks of whole rows), quantizes
//! the selected ones with the kernels of `crate::quant` on all cores, and writes every piece at its planned
//! offset of a temporary file in the destination folder; then fsync and rename. Any error (or a cancel from
//! the progress callback) removes the temporary file; the source is only ever read.
//!
//! Memory: one chunk of input (mapped pages, dropped from the RSS once consumed), its codes, scales and (for
//! ConvRot) its rotated f32 copy; nothing scales with the model. The header is written first: every output
//! size is known from the input's shapes.

use super::error::{IoError, IoResult};
use super::file::{TensorEntry, HEADER_LEN_BYTES};
use super::plan::{self, Granularity, Item, Options, Plan, QuantItem};
use super::source::Source;
use crate::quant::{self, hadamard, Element, ErrorStats, ErrorSums, Format};
use half::{bf16, f16};
use safetensors::tensor::Dtype;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Elements per chunk of a quantized tensor (32 MiB of bf16 input).
const CHUNK_ELEMS: usize = if cfg!(test) { 4096 } else { 16 << 20 };
/// Bytes per chunk of a copied tensor.
const COPY_CHUNK: usize = if cfg!(test) { 1000 } else { 64 << 20 };
/// |x| bits at and above which a value is NaN or infinite.
const NON_FINITE_BITS: u32 = 0x7F80_0000;

/// Where the writer stands, after each chunk.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    /// Input tensors finished so far, and their count.
    pub tensors_done: usize,
    pub tensors_total: usize,
    /// Input bytes processed so far, and their total.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The tensor being processed.
    pub tensor: &'a str,
}

/// One quantized layer in the report.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub tensor: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub granularity: Granularity,
    pub rotate: Option<usize>,
    /// The marker written (JSON), and whether it is one of ComfyUI's formats.
    pub marker: String,
    pub native: bool,
    pub bytes_before: usize,
    /// Codes + scales + marker.
    pub bytes_after: usize,
    /// Against the input (with ConvRot: in the rotated basis, where rmse and snr are the same and max_abs
    /// is that of the rotated weights).
    pub stats: ErrorStats,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub path: PathBuf,
    /// Sum of the input's tensor bytes, and the output file's size.
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub tensors: usize,
    pub layers: Vec<LayerReport>,
    pub seconds: f64,
}

/// Positional writes into the output (a trait so tests can inject failures).
pub trait Sink {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
}

impl Sink for File {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
}

/// Quantizes `src` into a new safetensors file at `dst` as `opts` says; see the module docs.
/// `progress` returns false to cancel. `overwrite` allows replacing an existing `dst` (never the input).
pub fn write_file(
    src: &dyn Source,
    dst: &Path,
    opts: &Options,
    overwrite: bool,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> IoResult<Report> {
    write_file_with(src, dst, opts, overwrite, progress, &mut |f| Box::new(f))
}

/// `write_file` with the output file wrapped by `wrap` (tests: simulated write failures).
pub fn write_file_with(
    src: &dyn Source,
    dst: &Path,
    opts: &Options,
    overwrite: bool,
    progress: &mut dyn FnMut(&Progress) -> bool,
    wrap: &mut dyn FnMut(File) -> Box<dyn Sink>,
) -> IoResult<Report> {
    let started = Instant::now();
    check_paths(src.path(), dst, overwrite)?;
    let plan = plan::plan(src.tensors(), src.metadata(), opts)?;
    let mut out = TempOutput::create(dst)?;
    let file = out
        .file
        .try_clone()
        .map_err(|e| IoError::os(&out.tmp, "duplicate handle", e))?;
    reserve(&file, plan.file_len() as u64, &out.tmp)?;
    let mut sink = wrap(file);
    let layers = write_all(src, &plan, opts.format, sink.as_mut(), progress, &out.tmp)?;
    drop(sink);
    out.commit(dst)?;
    Ok(Report {
        path: dst.to_path_buf(),
        input_bytes: src.tensors().iter().map(|t| t.nbytes() as u64).sum(),
        output_bytes: plan.file_len() as u64,
        tensors: src.tensors().len(),
        layers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Refuses to write over the input, into a missing folder, or over an existing file unless allowed.
fn check_paths(src: Option<&Path>, dst: &Path, overwrite: bool) -> IoResult<()> {
    let name = dst.file_name().ok_or_else(|| {
        IoError::Invalid(format!("the output path {} names no file", dst.display()))
    })?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let folder = parent
        .canonicalize()
        .map_err(|e| IoError::os(&parent, "find the output folder", e))?;
    let exists = dst.symlink_metadata().is_ok();
    if let Some(src) = src {
        let src_canon = src
            .canonicalize()
            .map_err(|e| IoError::os(src, "resolve", e))?;
        let dst_canon = if exists {
            dst.canonicalize()
                .map_err(|e| IoError::os(dst, "resolve", e))?
        } else {
            folder.join(name)
        };
        let same_inode = exists && same_file(src, dst);
        if src_canon == dst_canon || same_inode {
            return Err(IoError::Invalid(format!(
                "the output {} is the input file; write to another path (the input is never modified)",
                dst.display()
            )));
        }
    }
    if exists {
        if dst.is_dir() {
            return Err(IoError::Invalid(format!(
                "the output {} is a folder; give a file path",
                dst.display()
            )));
        }
        if !overwrite {
            return Err(IoError::os(
                dst,
                "create the output (it exists; pass overwrite to replace it)",
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Claims the output's disk space up front, so a full disk fails before any work (where supported).
fn reserve(file: &File, len: u64, path: &Path) -> IoResult<()> {
    use std::os::fd::AsRawFd;
    let Ok(len) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    // SAFETY: `file` is an open file descriptor for the duration of the call; posix_fallocate only
    // allocates blocks for it and touches no memory of ours.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate: the writes themselves will report a full disk.
        libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS => Ok(()),
        errno => Err(IoError::os(
            path,
            "reserve disk space for the output",
            std::io::Error::from_raw_os_error(errno),
        )),
    }
}

/// The temporary output file; removed on drop unless committed.
struct TempOutput {
    tmp: PathBuf,
    file: File,
    committed: bool,
}

impl TempOutput {
    fn create(dst: &Path) -> IoResult<Self> {
        let name = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = dst.with_file_name(format!(
            ".{name}.{}-{nanos:x}.vramkit-partial",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| IoError::os(&tmp, "create the temporary output", e))?;
        Ok(Self {
            tmp,
            file,
            committed: false,
        })
    }

    fn commit(&mut self, dst: &Path) -> IoResult<()> {
        self.file
            .sync_all()
            .map_err(|e| IoError::os(&self.tmp, "fsync", e))?;
        std::fs::rename(&self.tmp, dst).map_err(|e| IoError::os(dst, "rename into place", e))?;
        self.committed = true;
        if let Some(dir) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Makes the rename durable; a folder that cannot be opened for fsync (rare) is not an error.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

struct Writer<'a> {
    sink: &'a mut dyn Sink,
    base: u64,
    path: &'a Path,
}

impl Writer<'_> {
    fn at(&mut self, buf: &[u8], offset: usize) -> IoResult<()> {
        self.sink
            .write_at(buf, self.base + offset as u64)
            .map_err(|e| IoError::os(self.path, "write", e))
    }
}

struct Ticker<'a> {
    progress: &'a mut dyn FnMut(&Progress<'_>) -> bool,
    done: usize,
    total: usize,
    bytes: u64,
    bytes_total: u64,
}

impl Ticker<'_> {
    fn tick(&mut self, tensor: &str, bytes: usize) -> IoResult<()> {
        self.bytes += bytes as u64;
        let p = Progress {
            tensors_done: self.done,
            tensors_total: self.total,
            bytes_done: self.bytes,
            bytes_total: self.bytes_total,
            tensor,
        };
        if (self.progress)(&p) {
            Ok(())
        } else {
            Err(IoError::Cancelled)
        }
    }
}

fn write_all(
    src: &dyn Source,
    plan: &Plan,
    fmt: Format,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&Progress) -> bool,
    tmp: &Path,
) -> IoResult<Vec<LayerReport>> {
    let header_len = plan.header.len() as u64;
    let mut lead = Vec::with_capacity(HEADER_LEN_BYTES + plan.header.len());
    lead.extend_from_slice(&header_len.to_le_bytes());
    lead.extend_from_slice(&plan.header);
    sink.write_at(&lead, 0)
        .map_err(|e| IoError::os(tmp, "write", e))?;
    let mut w = Writer {
        sink,
        base: lead.len() as u64,
        path: tmp,
    };
    let tensors = src.tensors();
    let mut ticker = Ticker {
        progress,
        done: 0,
        total: tensors.len(),
        bytes: 0,
        bytes_total: tensors.iter().map(|t| t.nbytes() as u64).sum(),
    };
    let mut layers = Vec::new();
    for (t, item) in tensors.iter().zip(&plan.items) {
        match item {
            Item::Copy { out } => {
                let data = src.data(t);
                let start = plan.outputs[*out].start;
                let mut pos = 0;
                while pos < data.len() {
                    let end = (pos + COPY_CHUNK).min(data.len());
                    src.prefetch(t, end..(end + COPY_CHUNK).min(data.len()));
                    w.at(&data[pos..end], start + pos)?;
                    src.release(t, pos..end);
                    ticker.done += usize::from(end == data.len());
                    ticker.tick(&t.name, end - pos)?;
                    pos = end;
                }
                if data.is_empty() {
                    ticker.done += 1;
                    ticker.tick(&t.name, 0)?;
                }
            }
            Item::Quantize(q) => {
                let stats = match t.dtype {
                    Dtype::F32 => quantize_tensor::<f32>(src, t, q, plan, fmt, &mut w, &mut ticker),
                    Dtype::F16 => quantize_tensor::<f16>(src, t, q, plan, fmt, &mut w, &mut ticker),
                    Dtype::BF16 => {
                        quantize_tensor::<bf16>(src, t, q, plan, fmt, &mut w, &mut ticker)
                    }
                    other => Err(IoError::Invalid(format!(
                        "tensor {:?}: cannot quantize {other}",
                        t.name
                    ))),
                }?;
                let out = |i: usize| plan.outputs[i].end - plan.outputs[i].start;
                layers.push(LayerReport {
                    tensor: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    granularity: q.spec.granularity,
                    rotate: q.spec.rotate,
                    marker: String::from_utf8_lossy(&q.marker_bytes).into_owned(),
                    native: q.native,
                    bytes_before: t.nbytes(),
                    bytes_after: out(q.codes) + out(q.scales) + out(q.marker),
                    stats: stats.finish(),
                });
            }
        }
    }
    Ok(layers)
}

/// A typed view of `bytes`, or a copy into `scratch` when the bytes are not aligned for `T`.
fn typed<'a, T: bytemuck::Pod>(bytes: &'a [u8], scratch: &'a mut Vec<T>) -> &'a [T] {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => s,
        Err(_) => {
            scratch.clear();
            scratch.extend(
                bytes
                    .chunks_exact(std::mem::size_of::<T>())
                    .map(bytemuck::pod_read_unaligned::<T>),
            );
            scratch
        }
    }
}

fn tensor_err(t: &TensorEntry) -> impl Fn(crate::error::CoreError) -> IoError + '_ {
    move |source| IoError::Tensor {
        tensor: t.name.clone(),
        source,
    }
}

/// The error naming the first NaN/Inf of `chunk` (at flat index `offset + i` of the tensor).
fn non_finite<T: Element>(fmt: Format, t: &TensorEntry, chunk: &[T], offset: usize) -> IoError {
    match quant::block_scale(fmt, u32::MAX, chunk, offset) {
        Err(e) => tensor_err(t)(e),
        Ok(_) => IoError::Invalid(format!("tensor {:?} holds NaN or Inf", t.name)),
    }
}

/// A chunk's quantization error, with a NaN/Inf located in the whole tensor (not the chunk).
fn chunk_err<T: Element>(
    err: crate::error::CoreError,
    fmt: Format,
    t: &TensorEntry,
    chunk: &[T],
    offset: usize,
) -> IoError {
    match err {
        crate::error::CoreError::NonFinite(_) => non_finite(fmt, t, chunk, offset),
        other => tensor_err(t)(other),
    }
}

fn quantize_tensor<T: Element + bytemuck::Pod>(
    src: &dyn Source,
    t: &TensorEntry,
    q: &QuantItem,
    plan: &Plan,
    fmt: Format,
    w: &mut Writer,
    ticker: &mut Ticker<'_>,
) -> IoResult<ErrorSums> {
    let size = std::mem::size_of::<T>();
    let data = src.data(t);
    let n = t.numel();
    let codes_at = plan.outputs[q.codes].start;
    let scales_at = plan.outputs[q.scales].start;
    // Chunks of whole blocks (whole rows when per channel/group), about CHUNK_ELEMS elements.
    let step = match q.spec.granularity {
        Granularity::Tensor => CHUNK_ELEMS,
        _ => (CHUNK_ELEMS / q.row_len).max(1) * q.row_len,
    };
    let chunks: Vec<(usize, usize)> = (0..n)
        .step_by(step)
        .map(|s| (s, (s + step).min(n)))
        .collect();
    let mut scratch: Vec<T> = Vec::new();
    let mut codes = vec![0u8; step.min(n)];

    // Per tensor: the scale needs the whole tensor's amax first (a read-only pass).
    let tensor_scale = if q.spec.granularity == Granularity::Tensor {
        let mut amax = 0u32;
        for &(s, e) in &chunks {
            let x = typed::<T>(&data[s * size..e * size], &mut scratch);
            let a = quant::amax_of(x);
            if a >= NON_FINITE_BITS {
                return Err(non_finite(fmt, t, x, s));
            }
            amax = amax.max(a);
            src.release(t, s * size..e * size);
        }
        Some(quant::block_scale::<T>(fmt, amax, &[], 0).map_err(tensor_err(t))?)
    } else {
        None
    };

    let mut sums = ErrorSums::default();
    let mut rotated: Vec<f32> = Vec::new();
    for (c, &(s, e)) in chunks.iter().enumerate() {
        if let Some(&(ns, ne)) = chunks.get(c + 1) {
            src.prefetch(t, ns * size..ne * size);
        }
        let x = typed::<T>(&data[s * size..e * size], &mut scratch);
        let codes = &mut codes[..e - s];
        let part = if let Some(scale) = tensor_scale {
            quant::encode_with_scale(fmt, x, scale, codes).map_err(tensor_err(t))?;
            quant::error_sums(fmt, x, codes, Some(&[scale]), x.len()).map_err(tensor_err(t))?
        } else {
            let mut scales = vec![0f32; (e - s) / q.block_len];
            let part = if let Some(g) = q.spec.rotate {
                rotated.resize(e - s, 0.0);
                hadamard::rotate_groups(x, g, &mut rotated).map_err(tensor_err(t))?;
                quantize_block(fmt, &rotated, q.block_len, codes, &mut scales)
                    .map_err(|err| chunk_err(err, fmt, t, x, s))?;
                quant::error_sums(fmt, &rotated, codes, Some(&scales), q.block_len)
            } else {
                quantize_block(fmt, x, q.block_len, codes, &mut scales)
                    .map_err(|err| chunk_err(err, fmt, t, x, s))?;
                quant::error_sums(fmt, x, codes, Some(&scales), q.block_len)
            }
            .map_err(tensor_err(t))?;
            w.at(
                bytemuck::cast_slice(&scales),
                scales_at + s / q.block_len * 4,
            )?;
            part
        };
        sums = sums.merge(part);
        w.at(codes, codes_at + s)?;
        src.release(t, s * size..e * size);
        ticker.done += usize::from(c + 1 == chunks.len());
        ticker.tick(&t.name, (e - s) * size)?;
    }
    if let Some(scale) = tensor_scale {
        w.at(&scale.to_le_bytes(), scales_at)?;
    }
    w.at(&q.marker_bytes, plan.outputs[q.marker].start)?;
    Ok(sums)
}

/// `quant::quantize` of one chunk; its only data-dependent failure is a NaN/Inf (shapes were planned).
fn quantize_block<T: Element>(
    fmt: Format,
    x: &[T],
    block_len: usize,
    codes: &mut [u8],
    scales: &mut [f32],
) -> crate::error::CoreResult<()> {
    quant::quantize(fmt, x, block_len, codes, scales)
}

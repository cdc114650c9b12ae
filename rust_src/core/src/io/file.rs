//! A safetensors file opened through a read-only memory map, its header read and validated by the
//! `safetensors` crate (the reference implementation of the format; nothing here parses it by hand).
//!
//! The crate checks the header length, UTF-8, the JSON, dtype names, that every tensor's byte size matches
//! its dtype and shape, that the tensors tile the data area with no gap or overlap, and that the file ends
//! where the last tensor does. When it refuses a file, `diagnose` re-reads the header's tensor entries (with
//! the crate's own `TensorInfo` type) only to say *which* tensor is wrong and how.

use super::error::{IoError, IoResult};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensorError, TensorInfo};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The bytes before the header: its length as a little-endian u64.
pub const HEADER_LEN_BYTES: usize = 8;

/// One tensor of a file, in the order its data lies in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data area (after the header).
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Option<HashMap<String, String>>,
    tensors: Vec<TensorEntry>,
}

impl SafetensorsFile {
    /// Opens and validates `path`. The data pages are not read.
    pub fn open(path: &Path) -> IoResult<Self> {
        let file = File::open(path).map_err(|e| IoError::os(path, "open", e))?;
        let meta = file.metadata().map_err(|e| IoError::os(path, "stat", e))?;
        if !meta.is_file() {
            return Err(IoError::Invalid(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        if (meta.len() as usize) < HEADER_LEN_BYTES {
            return Err(IoError::corrupt(
                path,
                format!(
                    "the file has {} bytes; a safetensors file starts with an 8-byte header length",
                    meta.len()
                ),
            ));
        }
        // SAFETY: the map is read-only and outlives every slice taken from it (slices borrow `self`). Its
        // soundness rests on the file not being truncated or rewritten while we read it, the same contract
        // as every memory-mapped reader (safetensors, torch, ComfyUI); `madvise(DONTNEED)` later only drops
        // our resident copies of pages, which re-read the same bytes from the file if touched again.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| IoError::os(path, "memory-map", e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| diagnose(path, &map, e))?;
        let tensors = entries(&metadata);
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            metadata: metadata.metadata().clone(),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The JSON header's length in bytes (without the 8-byte length field).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The raw header bytes (the JSON text, padding included).
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[HEADER_LEN_BYTES..HEADER_LEN_BYTES + self.header_len]
    }

    pub fn file_len(&self) -> usize {
        self.map.len()
    }

    /// The header's `__metadata__` (string to string), if any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// The tensors in data order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Where the data area starts in the file.
    pub fn data_offset(&self) -> usize {
        HEADER_LEN_BYTES + self.header_len
    }

    /// The bytes of `t` (a view into the map: touching them reads the pages in).
    pub fn data(&self, t: &TensorEntry) -> &[u8] {
        let base = self.data_offset();
        &self.map[base + t.start..base + t.end]
    }

    /// Drops this process's resident copies of the pages holding `t`'s bytes `range` (relative to the
    /// tensor): they stop counting in the RSS, and the page cache keeps them for whoever reads next.
    pub fn release(&self, t: &TensorEntry, range: std::ops::Range<usize>) {
        let base = self.data_offset() + t.start;
        let (start, end) = (base + range.start, (base + range.end).min(self.map.len()));
        if end > start {
            // SAFETY: DONTNEED on a read-only, file-backed shared mapping only unmaps our copies of the
            // pages; a later access re-reads the same bytes from the file, so no slice ever sees different
            // contents. [start, end) lies inside the map (memmap2 rounds the start down to a page).
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// Asks the kernel to start reading `t`'s bytes `range` in the background.
    pub fn prefetch(&self, t: &TensorEntry, range: std::ops::Range<usize>) {
        let base = self.data_offset() + t.start;
        let (start, end) = (base + range.start, (base + range.end).min(self.map.len()));
        if end > start {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }
}

/// The tensors of a validated header, in data order.
fn entries(metadata: &Metadata) -> Vec<TensorEntry> {
    let infos = metadata.tensors();
    let mut out: Vec<TensorEntry> = metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = infos[&name];
            TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: info.data_offsets.0,
                end: info.data_offsets.1,
                name,
            }
        })
        .collect();
    out.sort_by_key(|t| (t.start, t.end));
    out
}

/// Turns the crate's refusal into a message naming the offending tensor where one can be found.
fn diagnose(path: &Path, buf: &[u8], err: SafeTensorError) -> IoError {
    let header_len = buf
        .get(..HEADER_LEN_BYTES)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let after = buf.len().saturating_sub(HEADER_LEN_BYTES);
    let detail = match err {
        SafeTensorError::HeaderTooSmall => {
            "the file is shorter than the 8-byte header length".to_string()
        }
        SafeTensorError::HeaderTooLarge => format!(
            "the header length field says {header_len} bytes, more than the 100 MB a safetensors header \
             may have (not a safetensors file, or a corrupt one)"
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "the header length field says {header_len} bytes but only {after} bytes follow it \
             (truncated, or not a safetensors file)"
        ),
        SafeTensorError::InvalidHeader(e) => format!("the header is not UTF-8 text ({e})"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            let text = e.to_string();
            if text.contains("unknown variant") {
                format!("the header names a dtype safetensors does not know: {text}")
            } else {
                format!("the header is not valid safetensors JSON: {text}")
            }
        }
        SafeTensorError::InvalidOffset(name) => offsets_detail(buf, header_len, &name),
        SafeTensorError::TensorInvalidInfo => size_detail(buf, header_len),
        SafeTensorError::MetadataIncompleteBuffer => {
            let data_len = after.saturating_sub(header_len as usize);
            match header_tensors(buf, header_len).and_then(|t| t.values().map(|i| i.data_offsets.1).max())
            {
                Some(end) if end > data_len => format!(
                    "the tensors need {end} data bytes but the file holds {data_len} after its header \
                     (truncated: {} bytes missing)",
                    end - data_len
                ),
                Some(end) => format!(
                    "the tensors end at data byte {end} but the file holds {data_len} data bytes \
                     ({} unexplained bytes at the end)",
                    data_len - end
                ),
                None => "the data area does not match the header".to_string(),
            }
        }
        SafeTensorError::ValidationOverflow => {
            "a tensor's shape is so large that its byte size overflows".to_string()
        }
        SafeTensorError::MisalignedSlice => {
            "a tensor of a sub-byte dtype does not fill a whole number of bytes".to_string()
        }
        other => other.to_string(),
    };
    IoError::corrupt(path, detail)
}

/// The header's tensor entries, read with the crate's `TensorInfo` (None when the header cannot be read).
fn header_tensors(buf: &[u8], header_len: u64) -> Option<BTreeMap<String, TensorInfo>> {
    let end = HEADER_LEN_BYTES.checked_add(usize::try_from(header_len).ok()?)?;
    let text = std::str::from_utf8(buf.get(HEADER_LEN_BYTES..end)?).ok()?;
    let mut raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    raw.remove("__metadata__");
    raw.into_iter()
        .map(|(k, v)| serde_json::from_value::<TensorInfo>(v).ok().map(|i| (k, i)))
        .collect()
}

fn offsets_detail(buf: &[u8], header_len: u64, name: &str) -> String {
    let generic = format!(
        "tensor {name:?} has data_offsets that do not follow the previous tensor's (tensors must tile \
         the data area without gaps or overlaps)"
    );
    let Some(tensors) = header_tensors(buf, header_len) else {
        return generic;
    };
    let mut spans: Vec<(&String, (usize, usize))> =
        tensors.iter().map(|(k, i)| (k, i.data_offsets)).collect();
    spans.sort_by_key(|(_, o)| *o);
    if let Some((n, (s, e))) = spans.iter().find(|(_, (s, e))| e < s) {
        return format!("tensor {n:?} has data_offsets [{s}, {e}]: the end lies before the start");
    }
    for pair in spans.windows(2) {
        let ((a, (a_s, a_e)), (b, (b_s, b_e))) = (pair[0], pair[1]);
        if b_s < a_e {
            return format!(
                "tensors {a:?} (data bytes {a_s}..{a_e}) and {b:?} (bytes {b_s}..{b_e}) overlap"
            );
        }
    }
    if let Some((first, (s, _))) = spans.first() {
        if *s != 0 {
            return format!(
                "the data area starts with {s} bytes no tensor owns (the first tensor, {first:?}, \
                 starts at byte {s})"
            );
        }
    }
    for pair in spans.windows(2) {
        let ((a, (_, a_e)), (b, (b_s, _))) = (pair[0], pair[1]);
        if b_s > a_e {
            return format!(
                "data bytes {a_e}..{b_s} between tensors {a:?} and {b:?} belong to no tensor"
            );
        }
    }
    generic
}

fn size_detail(buf: &[u8], header_len: u64) -> String {
    let generic = "a tensor's data_offsets span a different number of bytes than its dtype and \
                   shape need"
        .to_string();
    let Some(tensors) = header_tensors(buf, header_len) else {
        return generic;
    };
    for (name, info) in &tensors {
        let (s, e) = info.data_offsets;
        let Some(bits) = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
        else {
            continue;
        };
        if e.checked_sub(s) != Some(bits / 8) {
            return format!(
                "tensor {name:?} ({}, shape {:?}) needs {} bytes but its data_offsets [{s}, {e}] span {}",
                info.dtype,
                info.shape,
                bits / 8,
                e as i128 - s as i128
            );
        }
    }
    generic
}

//! Where the tensors to write come from: a mapped safetensors file, or buffers already in memory (a model
//! ComfyUI holds), behind one trait so the writer has one code path.

use super::error::{IoError, IoResult};
use super::file::{SafetensorsFile, TensorEntry};
use safetensors::tensor::Dtype;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;

pub trait Source: Sync {
    /// The tensors, in the order their bytes are best read.
    fn tensors(&self) -> &[TensorEntry];
    /// The bytes of `t`.
    fn data(&self, t: &TensorEntry) -> &[u8];
    /// The `__metadata__` to carry over.
    fn metadata(&self) -> Option<&HashMap<String, String>>;
    /// The file read, when there is one (the writer refuses to write over it).
    fn path(&self) -> Option<&Path> {
        None
    }
    /// Done with `range` of `t`'s bytes (a mapped file drops those pages from the RSS).
    fn release(&self, _t: &TensorEntry, _range: Range<usize>) {}
    /// About to read `range` of `t`'s bytes.
    fn prefetch(&self, _t: &TensorEntry, _range: Range<usize>) {}
}

impl Source for SafetensorsFile {
    fn tensors(&self) -> &[TensorEntry] {
        SafetensorsFile::tensors(self)
    }
    fn data(&self, t: &TensorEntry) -> &[u8] {
        SafetensorsFile::data(self, t)
    }
    fn metadata(&self) -> Option<&HashMap<String, String>> {
        SafetensorsFile::metadata(self)
    }
    fn path(&self) -> Option<&Path> {
        Some(SafetensorsFile::path(self))
    }
    fn release(&self, t: &TensorEntry, range: Range<usize>) {
        SafetensorsFile::release(self, t, range)
    }
    fn prefetch(&self, t: &TensorEntry, range: Range<usize>) {
        SafetensorsFile::prefetch(self, t, range)
    }
}

/// Tensors held in memory (little-endian bytes, C order), e.g. a model's state dict.
pub struct MemorySource<'a> {
    tensors: Vec<TensorEntry>,
    data: Vec<&'a [u8]>,
    index: HashMap<String, usize>,
    metadata: Option<HashMap<String, String>>,
}

impl<'a> MemorySource<'a> {
    /// Checks every tensor's byte length against its dtype and shape, and that names are unique.
    pub fn new(
        tensors: Vec<(String, Dtype, Vec<usize>, &'a [u8])>,
        metadata: Option<HashMap<String, String>>,
    ) -> IoResult<Self> {
        let mut seen = HashSet::new();
        let mut entries = Vec::with_capacity(tensors.len());
        let mut data = Vec::with_capacity(tensors.len());
        let mut pos = 0usize;
        for (name, dtype, shape, bytes) in tensors {
            if !seen.insert(name.clone()) {
                return Err(IoError::Invalid(format!("tensor {name:?} is given twice")));
            }
            let bits = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_mul(dtype.bitsize()));
            if bits != Some(bytes.len() * 8) {
                return Err(IoError::Invalid(format!(
                    "tensor {name:?}: {} bytes do not hold a {dtype} tensor of shape {shape:?}",
                    bytes.len()
                )));
            }
            entries.push(TensorEntry {
                name,
                dtype,
                shape,
                start: pos,
                end: pos + bytes.len(),
            });
            pos += bytes.len();
            data.push(bytes);
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Self {
            tensors: entries,
            data,
            index,
            metadata,
        })
    }
}

impl Source for MemorySource<'_> {
    fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }
    fn data(&self, t: &TensorEntry) -> &[u8] {
        // The writer only asks for entries of `tensors()`; an unknown one reads as empty.
        self.index.get(&t.name).map_or(&[], |&i| self.data[i])
    }
    fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }
}

//! A reader for the safetensors format: an 8-byte little-endian header
//! length, a JSON header naming each tensor's dtype, shape and byte range,
//! then the raw little-endian data. Only what the embedder needs (F32
//! tensors by name), with every length and offset checked: a truncated or
//! corrupt file is an error that names the tensor, never a panic.

use std::collections::HashMap;

use serde::Deserialize;

/// Why a safetensors file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafetensorsError {
    #[error("file is {0} bytes, too short for the 8-byte header length")]
    TooShort(usize),
    #[error("header length {len} does not fit in the {file} bytes of the file")]
    HeaderLength { len: u64, file: usize },
    #[error("header is not valid JSON: {0}")]
    HeaderJson(String),
    #[error("tensor {name:?}: {problem}")]
    Tensor { name: String, problem: String },
    #[error("tensor {0:?} is not in the file")]
    Missing(String),
}

/// The header allows at most this many bytes (the format's own limit).
const MAX_HEADER: u64 = 100 * 1024 * 1024;

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A tensor's place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range in the data section (after the header).
    pub start: usize,
    pub end: usize,
}

/// A parsed file: the header's tensors over the file's bytes.
pub struct SafeTensors<'a> {
    data: &'a [u8],
    tensors: HashMap<String, TensorInfo>,
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

impl<'a> SafeTensors<'a> {
    /// Parses the header of `bytes` (the whole file) and checks every
    /// tensor's byte range against its dtype, shape and the data section.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SafetensorsError> {
        let Some(len_bytes) = bytes.get(..8) else {
            return Err(SafetensorsError::TooShort(bytes.len()));
        };
        let mut le = [0u8; 8];
        le.copy_from_slice(len_bytes);
        let len = u64::from_le_bytes(le);
        let header_end = usize::try_from(len)
            .ok()
            .filter(|_| len <= MAX_HEADER)
            .and_then(|l| l.checked_add(8))
            .filter(|&e| e <= bytes.len())
            .ok_or(SafetensorsError::HeaderLength {
                len,
                file: bytes.len(),
            })?;
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..header_end])
                .map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?;
        let data = &bytes[header_end..];
        let mut tensors = HashMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = |problem: String| SafetensorsError::Tensor {
                name: name.clone(),
                problem,
            };
            let e: Entry = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            let size =
                dtype_size(&e.dtype).ok_or_else(|| bad(format!("unknown dtype {}", e.dtype)))?;
            let bytes_needed = e
                .shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {:?} overflows", e.shape)))?;
            let [start, end] = e.data_offsets;
            if start > end || end > data.len() {
                return Err(bad(format!(
                    "data offsets {start}..{end} outside the {} data bytes",
                    data.len()
                )));
            }
            if end - start != bytes_needed {
                return Err(bad(format!(
                    "{} bytes for {} of shape {:?} ({bytes_needed} bytes)",
                    end - start,
                    e.dtype,
                    e.shape
                )));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype: e.dtype,
                    shape: e.shape,
                    start,
                    end,
                },
            );
        }
        Ok(SafeTensors { data, tensors })
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The F32 tensor `name`, which must have exactly `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, SafetensorsError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| SafetensorsError::Missing(name.to_string()))?;
        let bad = |problem: String| SafetensorsError::Tensor {
            name: name.to_string(),
            problem,
        };
        if t.dtype != "F32" {
            return Err(bad(format!("dtype {}, expected F32", t.dtype)));
        }
        if t.shape != shape {
            return Err(bad(format!("shape {:?}, expected {shape:?}", t.shape)));
        }
        // parse() checked start..end against the data and the shape.
        Ok(self.data[t.start..t.end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    #[test]
    fn reads_f32_tensors_by_name() {
        let h = r#"{"__metadata__":{"format":"pt"},
            "a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},
            "b":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#;
        let bytes = file(h, &floats(&[1.0, 2.0, 3.0, -4.5, 7.0]));
        let st = SafeTensors::parse(&bytes).unwrap();
        assert_eq!(st.f32("a", &[2, 2]).unwrap(), vec![1.0, 2.0, 3.0, -4.5]);
        assert_eq!(st.f32("b", &[1]).unwrap(), vec![7.0]);
        let mut names: Vec<_> = st.names().collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn corrupt_files_are_errors() {
        assert_eq!(
            SafeTensors::parse(&[1, 2, 3]).err(),
            Some(SafetensorsError::TooShort(3))
        );
        // Header length past the end of the file.
        let mut bytes = file("{}", &[]);
        bytes[0] = 200;
        assert!(matches!(
            SafeTensors::parse(&bytes).err(),
            Some(SafetensorsError::HeaderLength { len: 200, .. })
        ));
        let huge = u64::MAX.to_le_bytes();
        assert!(matches!(
            SafeTensors::parse(&huge).err(),
            Some(SafetensorsError::HeaderLength { .. })
        ));
        assert!(matches!(
            SafeTensors::parse(&file("{not json", &[])).err(),
            Some(SafetensorsError::HeaderJson(_))
        ));
        // Data offsets beyond the data, or not matching the shape.
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let err = SafeTensors::parse(&file(h, &floats(&[1.0]))).err().unwrap();
        assert!(
            matches!(&err, SafetensorsError::Tensor { name, .. } if name == "a"),
            "{err}"
        );
        let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
        assert!(SafeTensors::parse(&file(h, &floats(&[1.0; 4]))).is_err());
        let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[8,4]}}"#;
        assert!(SafeTensors::parse(&file(h, &floats(&[1.0; 4]))).is_err());
        let h = r#"{"a":{"dtype":"F32","shape":[18446744073709551615, 2],"data_offsets":[0,4]}}"#;
        assert!(SafeTensors::parse(&file(h, &floats(&[1.0]))).is_err());
        let h = r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(SafeTensors::parse(&file(h, &floats(&[1.0]))).is_err());
        let h = r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,4]}}"#;
        assert!(SafeTensors::parse(&file(h, &floats(&[1.0]))).is_err());
    }

    #[test]
    fn wrong_dtype_shape_or_name_are_errors() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "i":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}}"#;
        let bytes = file(h, &[0u8; 16]);
        let st = SafeTensors::parse(&bytes).unwrap();
        assert!(st.f32("a", &[2]).is_ok());
        assert!(matches!(
            st.f32("a", &[1, 2]),
            Err(SafetensorsError::Tensor { .. })
        ));
        assert!(matches!(
            st.f32("i", &[1]),
            Err(SafetensorsError::Tensor { .. })
        ));
        assert_eq!(
            st.f32("nope", &[1]).err(),
            Some(SafetensorsError::Missing("nope".into()))
        );
    }
}

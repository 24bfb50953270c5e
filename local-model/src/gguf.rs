//! A reader for the GGUF container (versions 2 and 3): the header, the
//! metadata key/values and the tensor directory, plus each tensor's raw
//! bytes on demand. This is all the embedded model needs from a model file;
//! the kernels in [`crate::quant`] decode the bytes themselves.
//!
//! Every length read from the file is checked against the file's size before
//! anything is allocated, so a truncated or hostile file is an error, never a
//! huge allocation or a panic.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nest at most this deep (the format allows any depth; models use 1).
const MAX_DEPTH: usize = 4;
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an integer, whatever its integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::U8(x) => Some(i64::from(*x)),
            Value::I8(x) => Some(i64::from(*x)),
            Value::U16(x) => Some(i64::from(*x)),
            Value::I16(x) => Some(i64::from(*x)),
            Value::U32(x) => Some(i64::from(*x)),
            Value::I32(x) => Some(i64::from(*x)),
            Value::I64(x) => Some(*x),
            Value::U64(x) => i64::try_from(*x).ok(),
            _ => None,
        }
    }

    pub fn as_u32(&self) -> Option<u32> {
        self.as_i64().and_then(|v| u32::try_from(v).ok())
    }

    pub fn as_f32(&self) -> Option<f32> {
        match self {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A tensor's element type (the ggml type ids this crate can use; others
/// are kept by number so the error can name them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Q4_1,
    Q8_0,
    Other(u32),
}

impl DType {
    fn from_id(id: u32) -> DType {
        match id {
            0 => DType::F32,
            1 => DType::F16,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            other => DType::Other(other),
        }
    }

    /// (elements per block, bytes per block), for the types we can size.
    fn block(self) -> Option<(u64, u64)> {
        match self {
            DType::F32 => Some((1, 4)),
            DType::F16 => Some((1, 2)),
            DType::Q4_1 => Some((32, 20)),
            DType::Q8_0 => Some((32, 34)),
            DType::Other(_) => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    /// Outermost dimension first (`[rows, cols]` for a matrix), the reverse
    /// of the file's innermost-first order.
    pub dims: Vec<usize>,
    /// From the start of the tensor data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The tensor's size in bytes, or an error for a type we cannot size.
    pub fn byte_len(&self) -> Result<u64, String> {
        let (per_block, block_bytes) = self
            .dtype
            .block()
            .ok_or_else(|| format!("unsupported tensor type {:?}", self.dtype))?;
        let elems = self
            .dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d as u64))
            .ok_or("tensor size overflows")?;
        if elems % per_block != 0 {
            return Err(format!(
                "{elems} elements is not a multiple of the block size {per_block}"
            ));
        }
        (elems / per_block)
            .checked_mul(block_bytes)
            .ok_or_else(|| "tensor size overflows".to_string())
    }
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct Content {
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    file_len: u64,
}

struct Reader<'a, R> {
    r: &'a mut R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.bytes().map(u64::from_le_bytes)
    }
    /// A count of items of at least `min_size` bytes each that must still fit
    /// in the file.
    fn count(&mut self, min_size: u64, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        let left = self.len.saturating_sub(self.pos);
        if n.saturating_mul(min_size.max(1)) > left {
            return Err(format!(
                "{what}: {n} items cannot fit in the {left} bytes left"
            ));
        }
        usize::try_from(n).map_err(|_| format!("{what}: {n} items"))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1, "string")?;
        let mut b = vec![0u8; n];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += n as u64;
        String::from_utf8(b).map_err(|_| format!("string before byte {} is not UTF-8", self.pos))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err("metadata arrays nest too deep".into());
                }
                let item = self.u32()?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 12,
                };
                let n = self.count(min, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl Content {
    /// Reads the header and directory; leaves the tensor data unread.
    pub fn read<R: Read + Seek>(file: &mut R) -> Result<Content, String> {
        let len = file
            .seek(SeekFrom::End(0))
            .and_then(|l| file.seek(SeekFrom::Start(0)).map(|_| l))
            .map_err(|e| e.to_string())?;
        let mut r = Reader {
            r: file,
            pos: 0,
            len,
        };
        if r.u32()? != MAGIC {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version}; supported: 2 and 3"));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each metadata entry and each tensor entry takes at least 12 bytes.
        if n_tensors.saturating_add(n_kv).saturating_mul(12) > len {
            return Err(format!(
                "{n_tensors} tensors and {n_kv} metadata entries cannot fit in {len} bytes"
            ));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r
                .value(ty, 0)
                .map_err(|e| format!("metadata `{key}`: {e}"))?;
            metadata.insert(key, v);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}` has {n_dims} dimensions"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64()?;
                dims.push(
                    usize::try_from(d).map_err(|_| format!("tensor `{name}`: dimension {d}"))?,
                );
            }
            dims.reverse();
            let dtype = DType::from_id(r.u32()?);
            let offset = r.u64()?;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    dims,
                    offset,
                },
            );
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u32() {
                Some(a) if a > 0 && a.is_power_of_two() => u64::from(a),
                _ => return Err(format!("general.alignment is {v:?}")),
            },
        };
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        Ok(Content {
            metadata,
            tensors,
            data_offset,
            file_len: len,
        })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value, String> {
        self.metadata
            .get(key)
            .ok_or_else(|| format!("missing GGUF metadata `{key}`"))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32, String> {
        let v = self.get(key)?;
        v.as_u32()
            .ok_or_else(|| format!("GGUF metadata `{key}` is a {}, expected u32", v.type_name()))
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.metadata.get(key).and_then(Value::as_f32)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], String> {
        let v = self.get(key)?;
        v.as_array().ok_or_else(|| {
            format!(
                "GGUF metadata `{key}` is a {}, expected an array",
                v.type_name()
            )
        })
    }

    /// The raw bytes of tensor `name`, after checking they lie in the file.
    pub fn tensor_bytes<R: Read + Seek>(
        &self,
        file: &mut R,
        name: &str,
    ) -> Result<(TensorInfo, Vec<u8>), String> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("missing tensor `{name}`"))?;
        let n = info
            .byte_len()
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let start = self
            .data_offset
            .checked_add(info.offset)
            .filter(|s| s.checked_add(n).is_some_and(|end| end <= self.file_len))
            .ok_or_else(|| format!("tensor `{name}` lies past the end of the file"))?;
        let mut buf = vec![0u8; n as usize];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        Ok((info.clone(), buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }

    /// A tiny GGUF v3 file: two metadata entries and one 2x32 Q8_0 tensor,
    /// and where its header ends (before the alignment padding).
    fn sample_with_header_len() -> (Vec<u8>, usize) {
        let mut f = Vec::new();
        f.extend(MAGIC.to_le_bytes());
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes()); // tensors
        f.extend(2u64.to_le_bytes()); // kv
        s(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        s(&mut f, "llama");
        s(&mut f, "tokenizer.ggml.tokens");
        f.extend(9u32.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        s(&mut f, "a");
        s(&mut f, "b");
        s(&mut f, "w");
        f.extend(2u32.to_le_bytes());
        f.extend(32u64.to_le_bytes()); // innermost first
        f.extend(2u64.to_le_bytes());
        f.extend(8u32.to_le_bytes()); // Q8_0
        f.extend(0u64.to_le_bytes());
        let header = f.len();
        while f.len() % 32 != 0 {
            f.push(0);
        }
        f.extend((0..68u8).collect::<Vec<_>>());
        (f, header)
    }

    fn sample() -> Vec<u8> {
        sample_with_header_len().0
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let bytes = sample();
        let mut c = Cursor::new(bytes.clone());
        let ct = Content::read(&mut c).unwrap();
        assert_eq!(ct.get_str("general.architecture"), Some("llama"));
        let toks = ct.get_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(toks.len(), 2);
        let (info, raw) = ct.tensor_bytes(&mut c, "w").unwrap();
        assert_eq!(info.dims, vec![2, 32]);
        assert_eq!(info.dtype, DType::Q8_0);
        assert_eq!(raw, (0..68u8).collect::<Vec<_>>());
        assert!(ct.get_u32("general.architecture").is_err());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let (bytes, header) = sample_with_header_len();
        for cut in 0..header {
            let mut c = Cursor::new(bytes[..cut].to_vec());
            assert!(Content::read(&mut c).is_err(), "cut at {cut}");
        }
        // Tensor data cut short: the header reads, the tensor does not.
        let mut c = Cursor::new(bytes[..bytes.len() - 1].to_vec());
        let ct = Content::read(&mut c).unwrap();
        assert!(ct.tensor_bytes(&mut c, "w").is_err());
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut bytes = sample();
        // The first u64 2 is the metadata count.
        let at = bytes
            .windows(8)
            .position(|w| w == 2u64.to_le_bytes())
            .unwrap();
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Content::read(&mut Cursor::new(bytes)).is_err());
    }
}

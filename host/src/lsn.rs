//! Log sequence numbers: positions in PostgreSQL's write-ahead log.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log, printed the way PostgreSQL prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position, which PostgreSQL reads as "no position".
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `16/B374D848`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a PostgreSQL LSN (expected two hexadecimal numbers like `16/B374D848`)")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Lsn {
    /// Writes the text form into `buf`, returning it: no allocation, no formatter (this
    /// runs once per change document).
    pub fn to_text(self, buf: &mut [u8; 17]) -> &str {
        fn hex(mut v: u32, out: &mut [u8], at: usize) -> usize {
            let mut tmp = [0u8; 8];
            let mut n = 0;
            loop {
                tmp[n] = b"0123456789ABCDEF"[(v & 0xF) as usize];
                n += 1;
                v >>= 4;
                if v == 0 {
                    break;
                }
            }
            for i in 0..n {
                out[at + i] = tmp[n - 1 - i];
            }
            at + n
        }
        let mid = hex((self.0 >> 32) as u32, buf, 0);
        buf[mid] = b'/';
        let end = hex(self.0 as u32, buf, mid + 1);
        std::str::from_utf8(&buf[..end]).unwrap_or("0/0")
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 17];
        s.serialize_str(self.to_text(&mut buf))
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(l: pgwire_replication::Lsn) -> Self {
        Lsn(l.0)
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(l: Lsn) -> Self {
        pgwire_replication::Lsn(l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for text in ["0/0", "0/16B3748", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("0/16B3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748));
        for v in [0, 1, 0x16B3748, 0x16_B374_D848, u64::MAX] {
            let mut buf = [0u8; 17];
            assert_eq!(Lsn(v).to_text(&mut buf), Lsn(v).to_string());
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in ["", "16", "x/1", "1/", "/1", "1/2/3", "100000000/0"] {
            assert!(text.parse::<Lsn>().is_err(), "{text}");
        }
    }
}

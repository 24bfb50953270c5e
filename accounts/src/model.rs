//! What is stored about keys and teams, and money as exact integers.

use serde::{Deserialize, Serialize};

use optiroute_common::wire::Pool;
use optiroute_common::Error;

/// Money in nano-dollars (1e-9 USD): spend and budgets are summed as
/// integers, so every view adds up to the same figure.
pub type Nanos = u64;

pub const NANOS_PER_USD: f64 = 1e9;

/// The largest budget accepted, in USD.
pub const MAX_BUDGET_USD: f64 = 1e9;

/// `usd` in nano-dollars, rounded to the nearest (a cost is never negative
/// or infinite here: both are refused before).
pub fn to_nanos(usd: f64) -> Nanos {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).round() as Nanos
    } else {
        0
    }
}

pub fn to_usd(n: Nanos) -> f64 {
    n as f64 / NANOS_PER_USD
}

/// How long a budget lasts before it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A calendar day, UTC.
    Day,
    /// A calendar month, UTC.
    #[default]
    Month,
    /// Never resets.
    Total,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The window holding `now_ms` (Unix ms): its label (part of ledger
    /// keys: `d20261201`, `m202612`, `total`), its start and its end (the
    /// exact moment the budget resets; `None` for `total`).
    pub fn window(self, now_ms: u64) -> Window {
        let days = (now_ms / 86_400_000) as i64;
        let (y, m, d) = civil_from_days(days);
        match self {
            Period::Day => Window {
                label: format!("d{y:04}{m:02}{d:02}"),
                start_ms: days as u64 * 86_400_000,
                end_ms: Some((days as u64 + 1) * 86_400_000),
            },
            Period::Month => {
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Window {
                    label: format!("m{y:04}{m:02}"),
                    start_ms: days_from_civil(y, m, 1) as u64 * 86_400_000,
                    end_ms: Some(days_from_civil(ny, nm, 1) as u64 * 86_400_000),
                }
            }
            Period::Total => Window {
                label: "total".into(),
                start_ms: 0,
                end_ms: None,
            },
        }
    }
}

/// One period's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub label: String,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix ms time (messages, records).
pub fn rfc3339(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let (y, m, d) = civil_from_days(days);
    let s = (ms / 1000) % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Unix ms of an RFC 3339 time (`2026-12-01T08:00:00Z`, fractions and
/// `+01:00` offsets allowed) or of a date (`2026-12-01`, its midnight UTC).
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let (mo, d) = (mo as u32, d as u32);
    let days = days_from_civil(y, mo, d);
    // Day 31 of a 30-day month would roll over: refuse it.
    if civil_from_days(days) != (y, mo, d) {
        return None;
    }
    let mut ms = days * 86_400_000;
    if b.len() > 10 {
        if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        ms += (h * 3600 + mi * 60 + sec) * 1000;
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return None;
            }
            let frac = &s[start..i.min(start + 3)];
            ms += frac.parse::<i64>().ok()? * 10_i64.pow(3 - frac.len() as u32);
        }
        match s.get(i..)? {
            "Z" | "z" => {}
            off if off.len() == 6
                && matches!(off.as_bytes()[0], b'+' | b'-')
                && off.as_bytes()[3] == b':' =>
            {
                let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
                let sign = if off.starts_with('+') { 1 } else { -1 };
                ms -= sign * (oh * 3600 + om * 60) * 1000;
            }
            _ => return None,
        }
    }
    u64::try_from(ms).ok()
}

/// An API key as stored: never its secret, only the secret's SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// The secret's first characters, to tell keys apart in listings.
    pub hint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub budget_period: Period,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    /// Pools the key may use; `None`: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<Pool>>,
    /// Model names the key may ask for; `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Cap on each end user's (`user`) spend per `budget_period`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user_budget_usd: Option<f64>,
    pub created_ms: u64,
    #[serde(default)]
    pub revoked: bool,
}

/// A team: keys that share a budget (and, with `cache.scope = "team"`, a cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeamRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub budget_period: Period,
    pub created_ms: u64,
}

/// Team names and key ids are one KV key token each.
pub fn validate_name(field: &str, name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::bad_param(
            field,
            format!("{field} must be 1 to 64 letters, digits, `-` or `_`, got `{name}`"),
        ));
    }
    Ok(())
}

pub fn validate_budget(field: &str, usd: Option<f64>) -> Result<(), Error> {
    match usd {
        Some(v) if !(v.is_finite() && (0.0..=MAX_BUDGET_USD).contains(&v)) => {
            Err(Error::bad_param(
                field,
                format!("{field} must be between 0 and {MAX_BUDGET_USD} USD, got {v}"),
            ))
        }
        _ => Ok(()),
    }
}

pub fn validate_limit(field: &str, v: Option<u32>) -> Result<(), Error> {
    match v {
        Some(0) => Err(Error::bad_param(
            field,
            format!("{field} must be at least 1 (leave it out for no limit)"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_reset_exactly_at_utc_boundaries() {
        // 2026-12-01T08:16:08Z
        let now = 1_796_112_968_000;
        let d = Period::Day.window(now);
        assert_eq!(d.label, "d20261201");
        assert_eq!(rfc3339(d.start_ms), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(d.end_ms.unwrap_or(0)), "2026-12-02T00:00:00Z");
        let m = Period::Month.window(now);
        assert_eq!(m.label, "m202612");
        assert_eq!(rfc3339(m.end_ms.unwrap_or(0)), "2027-01-01T00:00:00Z");
        // The last millisecond of a day is still that day.
        let last = d.end_ms.unwrap_or(0) - 1;
        assert_eq!(Period::Day.window(last).label, "d20261201");
        assert_eq!(Period::Day.window(last + 1).label, "d20261202");
        // February in a leap year.
        let feb = days_from_civil(2028, 2, 29) as u64 * 86_400_000;
        assert_eq!(Period::Month.window(feb).label, "m202802");
        assert_eq!(
            rfc3339(Period::Month.window(feb).end_ms.unwrap_or(0)),
            "2028-03-01T00:00:00Z"
        );
        assert_eq!(Period::Total.window(now).end_ms, None);
    }

    #[test]
    fn rfc3339_times_and_dates() {
        assert_eq!(parse_rfc3339_ms("1970-01-01"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-12-01T08:16:08Z"),
            Some(1_796_112_968_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-12-01T08:16:08.25Z"),
            Some(1_796_112_968_250)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-12-01T09:16:08+01:00"),
            Some(1_796_112_968_000)
        );
        assert_eq!(parse_rfc3339_ms("2026-12-01"), Some(1_796_083_200_000));
        for bad in [
            "",
            "2026-13-01",
            "2026-02-30",
            "2026-12-01T25:00:00Z",
            "2026-12-01T08:16:08",
            "yesterday",
            "2026-12-01T08:16:08.Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn money_is_integer_nanos() {
        assert_eq!(to_nanos(0.000_000_001), 1);
        assert_eq!(to_nanos(1.5), 1_500_000_000);
        assert_eq!(to_nanos(-1.0), 0);
        assert_eq!(to_nanos(f64::NAN), 0);
        assert!((to_usd(1_500_000_000) - 1.5).abs() < 1e-12);
    }
}

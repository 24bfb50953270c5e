//! `optiroute spend export --since ... [--key ID]`: the spend records,
//! read straight from the spend stream (`<PREFIX>_SPEND`) over NATS, one
//! JSON record per line on stdout, in the order they were stored.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use optiroute_accounts::model::{parse_rfc3339_ms, validate_name};
use optiroute_accounts::spend;
use optiroute_accounts::store::now_ms;
use optiroute_accounts::Period;
use optiroute_common::config::Config;
use optiroute_common::protocol::{JetStreamNames, Subjects};

use crate::args::Args;

const USAGE: &str = "usage:
  optiroute spend export --since WHEN [--key ID] > spend.jsonl
    WHEN: an RFC 3339 time (2026-12-01T00:00:00Z), a date (2026-12-01, midnight UTC),
          `day` or `month` (the current UTC day or month) or `all`
    --key ID    only this key's records
options:
  --config FILE      the OptiRoute config (nats.url, nats.prefix, credentials); also OPTIROUTE_CONFIG
  --nats-url URL     overrides nats.url
  --timeout-secs N   give up after N seconds (default 600)";

pub async fn main(argv: Vec<String>) -> ExitCode {
    match run(argv).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optiroute spend: {e}");
            ExitCode::from(2)
        }
    }
}

/// Unix ms of `--since`.
fn since_ms(v: &str, now: u64) -> Result<u64, String> {
    match v {
        "day" => Ok(Period::Day.window(now).start_ms),
        "month" => Ok(Period::Month.window(now).start_ms),
        "all" => Ok(0),
        _ => parse_rfc3339_ms(v).ok_or_else(|| {
            format!(
                "--since `{v}`: expected an RFC 3339 time, a date (YYYY-MM-DD), day, month or all"
            )
        }),
    }
}

async fn run(argv: Vec<String>) -> Result<(), String> {
    let mut argv = argv.into_iter().peekable();
    let action = argv.next_if(|a| !a.starts_with('-'));
    let mut args = Args::new(argv);
    if args.help() {
        println!("{USAGE}");
        return Ok(());
    }
    if action.as_deref() != Some("export") {
        return Err(format!("expected `export`\n{USAGE}"));
    }
    let since = args
        .value("since")?
        .ok_or_else(|| format!("--since is required\n{USAGE}"))?;
    let since = since_ms(&since, now_ms())?;
    let key = args.value("key")?;
    if let Some(k) = &key {
        validate_name("key", k).map_err(|e| e.message)?;
    }
    let config = args.value("config")?;
    let nats_url = args.value("nats-url")?;
    let timeout = args.parsed::<u64>("timeout-secs")?.unwrap_or(600);
    args.finish()?;

    let env: Vec<(String, String)> = std::env::vars().collect();
    let path = config
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("OPTIROUTE_CONFIG").map(Into::into));
    let sets: Vec<(String, String)> = nats_url
        .map(|u| vec![("nats.url".to_string(), u)])
        .unwrap_or_default();
    let cfg = Config::from_parts(path.as_deref(), &env, &sets).map_err(|e| e.message)?;
    let client = optiroute_common::nats::connect(&cfg.nats, "optiroute-spend-export")
        .await
        .map_err(|e| e.message)?;
    let js = async_nats::jetstream::new(client);
    let stream = JetStreamNames::for_prefix(&cfg.nats.prefix).spend_stream;
    let subjects = Subjects::new(&cfg.nats.prefix);
    let filter = match &key {
        Some(k) => subjects.spend(k),
        None => subjects.spend_all(),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_error = None;
    spend::scan_window(
        &js,
        &stream,
        &filter,
        since,
        None,
        Duration::from_secs(timeout),
        |r| {
            if write_error.is_some() {
                return;
            }
            let line = serde_json::to_string(&r).map_err(|e| e.to_string());
            let written = line.and_then(|l| writeln!(out, "{l}").map_err(|e| e.to_string()));
            if let Err(e) = written {
                write_error = Some(e);
            }
        },
    )
    .await
    .map_err(|e| e.message)?;
    if let Some(e) = write_error {
        return Err(format!("writing the records: {e}"));
    }
    out.flush().map_err(|e| format!("writing the records: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_dates_and_periods() {
        let now = 1_796_112_968_000; // 2026-12-01T08:16:08Z
        assert_eq!(since_ms("day", now), Ok(1_796_083_200_000));
        assert_eq!(since_ms("month", now), Ok(1_796_083_200_000));
        assert_eq!(since_ms("all", now), Ok(0));
        assert_eq!(since_ms("2026-12-01T08:16:08Z", now), Ok(now));
        assert!(since_ms("last week", now).unwrap_err().contains("--since"));
    }
}

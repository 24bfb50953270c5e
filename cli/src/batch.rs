//! `optiroute batch submit|status|results|cancel`: batch runs through the
//! ingress's `/v1/batches` API.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::args::Args;

const USAGE: &str = "usage:
  optiroute batch submit FILE.jsonl [--id ID] [--wait]   submit a JSONL file; prints the batch (its id first)
  optiroute batch status ID [--wait]                     progress; --wait shows a progress bar until it ends
  optiroute batch results ID                             one JSON line per input line, in input order
  optiroute batch cancel ID                              drop the jobs not started yet
options:
  --url URL    the ingress (default http://127.0.0.1:8000)";

pub async fn main(argv: Vec<String>) -> ExitCode {
    match run(argv).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("optiroute batch: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(argv: Vec<String>) -> Result<ExitCode, String> {
    let mut args = Args::new(argv);
    if args.help() {
        println!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    let url = args
        .value("url")?
        .unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let id_flag = args.value("id")?;
    let wait = args.switch("wait");
    let mut positional = args.positional();
    args.finish()?;
    let base = format!("{}/v1/batches", url.trim_end_matches('/'));
    let http = reqwest::Client::new();
    let (action, target) = match (positional.first().cloned(), positional.get(1).cloned()) {
        (Some(a), Some(t)) if positional.len() == 2 => (a, t),
        _ => return Err(format!("expected an action and a FILE or ID\n{USAGE}")),
    };
    positional.clear();
    match action.as_str() {
        "submit" => {
            // Streamed from the file, never read whole into memory.
            let file = tokio::fs::File::open(&target)
                .await
                .map_err(|e| format!("{target}: {e}"))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let mut req = http.post(&base).body(body);
            if let Some(id) = &id_flag {
                req = req.query(&[("id", id)]);
            }
            let status = call(req).await?;
            let id = status["id"].as_str().unwrap_or_default().to_string();
            println!("{status}");
            if wait {
                return wait_for(&http, &base, &id).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        "status" if wait => wait_for(&http, &base, &target).await,
        "status" => {
            println!("{}", call(http.get(format!("{base}/{target}"))).await?);
            Ok(ExitCode::SUCCESS)
        }
        "cancel" => {
            println!(
                "{}",
                call(http.post(format!("{base}/{target}/cancel"))).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        "results" => {
            let resp = http
                .get(format!("{base}/{target}/results"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(error_text(resp).await);
            }
            let text = resp.text().await.map_err(|e| e.to_string())?;
            std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown action `{other}`\n{USAGE}")),
    }
}

async fn error_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or("no details");
    format!("{status}: {message}")
}

async fn call(req: reqwest::RequestBuilder) -> Result<Value, String> {
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach the ingress: {e}"))?;
    if !resp.status().is_success() {
        return Err(error_text(resp).await);
    }
    resp.json().await.map_err(|e| e.to_string())
}

/// Polls the status with a progress bar on stderr until the batch ends;
/// prints the final status on stdout. Exit code 1 if any line failed.
async fn wait_for(http: &reqwest::Client, base: &str, id: &str) -> Result<ExitCode, String> {
    loop {
        let s = call(http.get(format!("{base}/{id}"))).await?;
        eprint!("\r{}", progress_line(&s));
        if s["status"] == "incomplete" {
            eprintln!();
            println!("{s}");
            return Err(format!(
                "batch {id}: only {} of {} lines were submitted; submit the same file again to complete it",
                s["submitted"].as_u64().unwrap_or(0),
                s["total"].as_u64().unwrap_or(0)
            ));
        }
        if s["status"] != "running" {
            eprintln!();
            println!("{s}");
            let failed = s["failed"].as_u64().unwrap_or(0);
            return Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `[########------------]  40%  4/10 done · 0 failed · 6 pending · $0.000123 · eta 3s`
pub fn progress_line(s: &Value) -> String {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let total = n("total").max(1);
    let finished = n("done") + n("failed") + n("cancelled");
    let width = 20;
    let filled = (finished * width / total).min(width) as usize;
    let eta = s["eta_seconds"]
        .as_f64()
        .map(|e| format!(" · eta {e:.0}s"))
        .unwrap_or_default();
    format!(
        "[{}{}] {:3}%  {}/{} done · {} failed · {} pending · ${:.6}{eta}",
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        finished * 100 / total,
        n("done"),
        n("total"),
        n("failed"),
        n("pending"),
        s["cost_usd"].as_f64().unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_shows_the_share_finished() {
        let s = serde_json::json!({"total": 10, "done": 3, "failed": 1, "cancelled": 0, "pending": 6, "cost_usd": 0.00012, "eta_seconds": 2.6});
        let line = progress_line(&s);
        assert!(line.starts_with("[########------------]  40%"), "{line}");
        assert!(
            line.contains("3/10 done · 1 failed · 6 pending · $0.000120 · eta 3s"),
            "{line}"
        );
        let done = serde_json::json!({"total": 2, "done": 2, "failed": 0, "cancelled": 0, "pending": 0, "cost_usd": 0.0});
        assert!(progress_line(&done).starts_with("[####################] 100%"));
    }
}

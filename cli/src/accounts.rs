//! `optiroute keys ...` and `optiroute teams ...`: the ingress's admin API
//! (`/admin/keys`, `/admin/teams`) from the command line. Every command
//! prints the answer's JSON on stdout.

use std::process::ExitCode;

use serde_json::{Map, Value};

use crate::args::Args;

const KEYS_USAGE: &str = "usage:
  optiroute keys create NAME [limits]   a new key; prints it with its secret (`key`), shown only this once
  optiroute keys list                   every key (revoked ones too), never a secret
  optiroute keys show ID
  optiroute keys update ID [limits]     changes only what is given; `none` clears a limit
  optiroute keys revoke ID              refused everywhere from now on; its record and spend stay
limits:
  --team NAME (create only)  --budget-usd USD  --budget-period day|month|total
  --rpm N  --tpm N  --providers local,cloud  --models m1,m2  --end-user-budget-usd USD  --name NAME (update)
options:
  --url URL          the ingress (default http://127.0.0.1:8000)
  --admin-key KEY    the admin key (default: env OPTIROUTE_ADMIN_KEY)";

const TEAMS_USAGE: &str = "usage:
  optiroute teams create NAME [--budget-usd USD] [--budget-period day|month|total]
  optiroute teams list
  optiroute teams show NAME
  optiroute teams update NAME [--budget-usd USD|none] [--budget-period day|month|total]
  optiroute teams delete NAME           only a team without live keys
options:
  --url URL          the ingress (default http://127.0.0.1:8000)
  --admin-key KEY    the admin key (default: env OPTIROUTE_ADMIN_KEY)";

pub async fn keys(argv: Vec<String>) -> ExitCode {
    report("keys", run(Kind::Keys, argv).await)
}

pub async fn teams(argv: Vec<String>) -> ExitCode {
    report("teams", run(Kind::Teams, argv).await)
}

fn report(what: &str, r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optiroute {what}: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Keys,
    Teams,
}

/// A flag's value as JSON: `none` (or `null`) clears, else parsed as `T`.
fn field<T: std::str::FromStr + serde::Serialize>(
    args: &mut Args,
    flag: &str,
    nullable: bool,
) -> Result<Option<Value>, String>
where
    T::Err: std::fmt::Display,
{
    let Some(v) = args.value(flag)? else {
        return Ok(None);
    };
    if nullable && (v == "none" || v == "null") {
        return Ok(Some(Value::Null));
    }
    let parsed: T = v.parse().map_err(|e| format!("--{flag} `{v}`: {e}"))?;
    serde_json::to_value(parsed)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A comma-separated list flag as a JSON array (`none` clears).
fn list(args: &mut Args, flag: &str, nullable: bool) -> Result<Option<Value>, String> {
    let Some(v) = args.value(flag)? else {
        return Ok(None);
    };
    if nullable && (v == "none" || v == "null") {
        return Ok(Some(Value::Null));
    }
    Ok(Some(Value::Array(
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect(),
    )))
}

/// The body of a create (`nullable = false`) or an update from the flags.
fn body(kind: Kind, args: &mut Args, creating: bool) -> Result<Map<String, Value>, String> {
    let nullable = !creating;
    let mut b = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            b.insert(k.to_string(), v);
        }
    };
    put("budget_usd", field::<f64>(args, "budget-usd", nullable)?);
    put(
        "budget_period",
        args.value("budget-period")?.map(Value::String),
    );
    if kind == Kind::Keys {
        if creating {
            put("team", args.value("team")?.map(Value::String));
        } else {
            put("name", args.value("name")?.map(Value::String));
        }
        put("rpm", field::<u32>(args, "rpm", nullable)?);
        put("tpm", field::<u32>(args, "tpm", nullable)?);
        put("providers", list(args, "providers", nullable)?);
        put("models", list(args, "models", nullable)?);
        put(
            "end_user_budget_usd",
            field::<f64>(args, "end-user-budget-usd", nullable)?,
        );
    }
    Ok(b)
}

async fn run(kind: Kind, argv: Vec<String>) -> Result<(), String> {
    let usage = match kind {
        Kind::Keys => KEYS_USAGE,
        Kind::Teams => TEAMS_USAGE,
    };
    // The action comes first: it decides which flags there are.
    let mut argv = argv.into_iter().peekable();
    let action = argv.next_if(|a| !a.starts_with('-'));
    let mut args = Args::new(argv);
    if args.help() {
        println!("{usage}");
        return Ok(());
    }
    let url = args
        .value("url")?
        .unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let admin_key = args
        .value("admin-key")?
        .or_else(|| std::env::var("OPTIROUTE_ADMIN_KEY").ok())
        .filter(|k| !k.is_empty())
        .ok_or("no admin key: pass --admin-key or set OPTIROUTE_ADMIN_KEY")?;
    let creating = action.as_deref() == Some("create");
    let updating = action.as_deref() == Some("update");
    let body = if creating || updating {
        Some(body(kind, &mut args, creating)?)
    } else {
        None
    };
    let target = args.positional();
    args.finish()?;
    let base = format!(
        "{}/admin/{}",
        url.trim_end_matches('/'),
        match kind {
            Kind::Keys => "keys",
            Kind::Teams => "teams",
        }
    );
    let one = |what: &str| -> Result<String, String> {
        match target.as_slice() {
            [t] => Ok(t.clone()),
            _ => Err(format!(
                "`{what}` takes exactly one {}\n{usage}",
                match kind {
                    Kind::Keys if what == "create" => "NAME",
                    Kind::Keys => "ID",
                    Kind::Teams => "NAME",
                }
            )),
        }
    };
    let http = reqwest::Client::new();
    let req = match action.as_deref() {
        Some("create") => {
            let mut b = body.unwrap_or_default();
            b.insert("name".into(), Value::String(one("create")?));
            http.post(&base).json(&b)
        }
        Some("list") if target.is_empty() => http.get(&base),
        Some("show") => http.get(format!("{base}/{}", one("show")?)),
        Some("update") => http
            .patch(format!("{base}/{}", one("update")?))
            .json(&body.unwrap_or_default()),
        Some("revoke") if kind == Kind::Keys => http.delete(format!("{base}/{}", one("revoke")?)),
        Some("delete") if kind == Kind::Teams => http.delete(format!("{base}/{}", one("delete")?)),
        Some(other) => return Err(format!("unknown action or arguments `{other}`\n{usage}")),
        None => return Err(format!("expected an action\n{usage}")),
    };
    let resp = req
        .bearer_auth(admin_key)
        .send()
        .await
        .map_err(|e| format!("cannot reach the ingress at {url}: {e}"))?;
    let status = resp.status();
    let answer: Value = resp
        .json()
        .await
        .map_err(|e| format!("{status}: unreadable answer: {e}"))?;
    if !status.is_success() {
        let e = &answer["error"];
        let param = e["param"]
            .as_str()
            .map(|p| format!(" (field `{p}`)"))
            .unwrap_or_default();
        return Err(format!(
            "{status}: {}{param}",
            e["message"].as_str().unwrap_or("no details")
        ));
    }
    println!("{answer}");
    Ok(())
}

//! The admin API (`/admin/*`, guarded by the admin key) and `GET /v1/usage`
//! (a user key's own spend). Keys and teams are read and written in the
//! accounts KV bucket; spend is summed from the spend stream's records, the
//! same records budgets are charged from, so every view adds up alike.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use optiroute_accounts::model::{rfc3339, Window};
use optiroute_accounts::spend::{self, SpendRecord, Totals};
use optiroute_accounts::store::now_ms;
use optiroute_accounts::{
    to_nanos, to_usd, AccountStore, KeyChanges, NewKey, NewTeam, Period, TeamChanges,
};
use optiroute_common::protocol::{JetStreamNames, Subjects};
use optiroute_common::wire::{self, Format};
use optiroute_common::{Error, ErrorKind};

use crate::{bearer, constant_time_eq, ApiError, AppState};

/// Longest a spend total may take to read from the stream (then 504).
const SCAN_LIMIT: Duration = Duration::from_secs(10);

/// `/admin/keys`, `/admin/teams`, `/admin/spend` and `/v1/usage`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", post(create_key).get(list_keys))
        .route(
            "/admin/keys/{id}",
            get(show_key).patch(update_key).delete(revoke_key),
        )
        .route("/admin/teams", post(create_team).get(list_teams))
        .route(
            "/admin/teams/{name}",
            get(show_team).patch(update_team).delete(delete_team),
        )
        .route("/admin/spend", get(admin_spend))
        .route("/v1/usage", get(usage))
}

/// The accounts bucket and the spend stream, opened on first use so the
/// ingress starts without JetStream.
pub(crate) struct Accounts {
    store: AccountStore,
    js: jetstream::Context,
    spend_stream: String,
    subjects: Subjects,
}

async fn accounts(state: &AppState) -> Result<&Accounts, ApiError> {
    let s = &state.inner;
    s.accounts
        .get_or_try_init(|| async {
            let cfg = &s.config;
            let js = jetstream::new(s.client.clone());
            let names = JetStreamNames::for_prefix(&cfg.nats.prefix);
            let subjects = Subjects::new(&cfg.nats.prefix);
            let store = AccountStore::open(&js, &names.accounts_bucket, cfg.nats.replicas).await?;
            spend::ensure_stream(
                &js,
                &names.spend_stream,
                &subjects.spend_all(),
                cfg.nats.replicas,
                cfg.auth.spend_retention_days,
            )
            .await?;
            Ok::<_, Error>(Accounts {
                store,
                js,
                spend_stream: names.spend_stream,
                subjects,
            })
        })
        .await
        .map_err(fail)
}

fn fail(e: Error) -> ApiError {
    ApiError::new(e, None)
}

fn unauthorized(message: &str) -> ApiError {
    fail(Error::new(ErrorKind::InvalidApiKey, message))
}

/// Proof that the request carries the admin key; every `/admin` handler
/// takes one.
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state
            .inner
            .config
            .auth
            .admin_key
            .as_deref()
            .filter(|k| !k.is_empty())
        else {
            return Err(unauthorized(
                "the admin API is off: no admin key is configured; set OPTIROUTE_ADMIN_KEY \
                 (or auth.admin_key) and restart the ingress",
            ));
        };
        match bearer(&parts.headers) {
            None => Err(unauthorized(
                "no admin key: send `Authorization: Bearer <admin key>`",
            )),
            Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(Admin),
            Some(_) => Err(unauthorized("wrong admin key")),
        }
    }
}

/// A JSON body as `T`; the error names the field at fault (a wrong type
/// or value, an unknown or a missing field).
fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|rej| ApiError {
        error: Error::bad_request(format!("cannot read the body: {}", rej.body_text())),
        request_id: None,
        status: Some(rej.status()),
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(fail(Error::bad_request("a JSON object body is required")));
    }
    wire::decode(Format::Json, &body).map_err(|mut e| {
        if e.param.is_none() {
            for marker in ["unknown field `", "missing field `"] {
                let field = e
                    .message
                    .split_once(marker)
                    .and_then(|(_, rest)| rest.split_once('`').map(|(f, _)| f.to_string()));
                if field.is_some() {
                    e.param = field;
                    break;
                }
            }
        }
        fail(e)
    })
}

/// A record as JSON without its secret's hash: the hash never leaves the store.
fn without_hash<T: Serialize>(v: &T) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(v)
        .map_err(|e| fail(Error::internal(format!("cannot encode a record: {e}"))))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("hash");
    }
    Ok(v)
}

fn not_found(what: &str, id: &str) -> ApiError {
    fail(Error::new(ErrorKind::NotFound, format!("no {what} `{id}`")))
}

type Body = Result<Bytes, BytesRejection>;

async fn create_key(
    _: Admin,
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, ApiError> {
    let new: NewKey = json_body(body)?;
    let created = accounts(&state)
        .await?
        .store
        .create_key(new)
        .await
        .map_err(fail)?;
    Ok((StatusCode::CREATED, Json(without_hash(&created)?)).into_response())
}

async fn list_keys(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let keys = accounts(&state).await?.store.keys().await.map_err(fail)?;
    let keys = keys
        .iter()
        .map(without_hash)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "keys": keys })))
}

async fn show_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match accounts(&state).await?.store.key(&id).await.map_err(fail)? {
        Some(k) => Ok(Json(without_hash(&k)?)),
        None => Err(not_found("key", &id)),
    }
}

async fn update_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let changes: KeyChanges = json_body(body)?;
    let k = accounts(&state)
        .await?
        .store
        .update_key(&id, changes)
        .await
        .map_err(fail)?;
    Ok(Json(without_hash(&k)?))
}

/// Revokes: the record stays (its spend is still its own), refused everywhere.
async fn revoke_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let k = accounts(&state)
        .await?
        .store
        .revoke_key(&id)
        .await
        .map_err(fail)?;
    Ok(Json(without_hash(&k)?))
}

async fn create_team(
    _: Admin,
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, ApiError> {
    let new: NewTeam = json_body(body)?;
    let team = accounts(&state)
        .await?
        .store
        .create_team(new)
        .await
        .map_err(fail)?;
    Ok((StatusCode::CREATED, Json(team)).into_response())
}

async fn list_teams(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let teams = accounts(&state).await?.store.teams().await.map_err(fail)?;
    Ok(Json(json!({ "teams": teams })))
}

async fn show_team(
    _: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match accounts(&state)
        .await?
        .store
        .team(&name)
        .await
        .map_err(fail)?
    {
        Some(t) => Ok(Json(serde_json::to_value(t).unwrap_or_default())),
        None => Err(not_found("team", &name)),
    }
}

async fn update_team(
    _: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let changes: TeamChanges = json_body(body)?;
    let t = accounts(&state)
        .await?
        .store
        .update_team(&name, changes)
        .await
        .map_err(fail)?;
    Ok(Json(serde_json::to_value(t).unwrap_or_default()))
}

async fn delete_team(
    _: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    accounts(&state)
        .await?
        .store
        .delete_team(&name)
        .await
        .map_err(fail)?;
    Ok(Json(json!({ "name": name, "deleted": true })))
}

/// A window as the answers show it: the period, its start and when it resets.
fn window_json(period: Period, w: &Window) -> Value {
    json!({
        "period": period.as_str(),
        "start": rfc3339(w.start_ms),
        "resets_at": w.end_ms.map(rfc3339),
    })
}

/// The figures of a group of records, flattened into `into`.
fn add_totals(into: &mut Value, t: &Totals) {
    if let (Some(o), Ok(Value::Object(t))) = (into.as_object_mut(), serde_json::to_value(t)) {
        o.extend(t);
    }
}

/// Sums the records of the window on `filter` kept by `keep`.
async fn sum(
    acc: &Accounts,
    filter: &str,
    w: &Window,
    mut each: impl FnMut(SpendRecord),
) -> Result<(), ApiError> {
    spend::scan_window(
        &acc.js,
        &acc.spend_stream,
        filter,
        w.start_ms,
        w.end_ms,
        SCAN_LIMIT,
        &mut each,
    )
    .await
    .map_err(fail)
}

#[derive(Clone, Copy, PartialEq)]
enum GroupBy {
    Key,
    Team,
    User,
}

fn parse_query(q: &BTreeMap<String, String>) -> Result<(GroupBy, Period), ApiError> {
    let mut group_by = GroupBy::Key;
    let mut period = Period::Month;
    for (k, v) in q {
        match k.as_str() {
            "group_by" => {
                group_by = match v.as_str() {
                    "key" => GroupBy::Key,
                    "team" => GroupBy::Team,
                    "user" => GroupBy::User,
                    _ => {
                        return Err(fail(Error::bad_param(
                            "group_by",
                            format!("group_by must be key, team or user, got `{v}`"),
                        )))
                    }
                }
            }
            "period" => {
                period = match v.as_str() {
                    "day" => Period::Day,
                    "month" => Period::Month,
                    "total" => Period::Total,
                    _ => {
                        return Err(fail(Error::bad_param(
                            "period",
                            format!("period must be day, month or total, got `{v}`"),
                        )))
                    }
                }
            }
            other => {
                return Err(fail(Error::bad_param(
                    other,
                    format!("unknown parameter `{other}` (known: group_by, period)"),
                )))
            }
        }
    }
    Ok((group_by, period))
}

/// `GET /admin/spend?group_by=key|team|user&period=day|month|total`: the
/// spend of the current window by group (`user` groups are per key: the
/// same end user name under two keys is two users), biggest first.
async fn admin_spend(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rej| fail(Error::bad_request(rej.body_text())))?;
    let (group_by, period) = parse_query(&query)?;
    let acc = accounts(&state).await?;
    let w = period.window(now_ms());
    let mut groups: BTreeMap<(Option<String>, Option<String>), Totals> = BTreeMap::new();
    let mut total = Totals::default();
    sum(acc, &acc.subjects.spend_all(), &w, |r| {
        total.add(&r);
        let group = match group_by {
            GroupBy::Key => (Some(r.key_id.clone()), None),
            GroupBy::Team => (r.team.clone(), None),
            GroupBy::User => (Some(r.key_id.clone()), r.user.clone()),
        };
        groups.entry(group).or_default().add(&r);
    })
    .await?;
    let names: BTreeMap<String, String> = if group_by == GroupBy::Key && !groups.is_empty() {
        acc.store
            .keys()
            .await
            .map_err(fail)?
            .into_iter()
            .map(|k| (k.id, k.name))
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.cost_nanos.cmp(&a.1.cost_nanos).then(a.0.cmp(&b.0)));
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|((first, second), t)| {
            let mut g = match group_by {
                GroupBy::Key => {
                    let name = first.as_ref().and_then(|id| names.get(id));
                    json!({ "key_id": first, "name": name })
                }
                GroupBy::Team => json!({ "team": first }),
                GroupBy::User => json!({ "key_id": first, "user": second }),
            };
            add_totals(&mut g, &t);
            g
        })
        .collect();
    let mut body = window_json(period, &w);
    if let Some(o) = body.as_object_mut() {
        o.insert(
            "group_by".into(),
            json!(match group_by {
                GroupBy::Key => "key",
                GroupBy::Team => "team",
                GroupBy::User => "user",
            }),
        );
        o.insert("groups".into(), Value::Array(groups));
        o.insert(
            "total".into(),
            serde_json::to_value(&total).unwrap_or_default(),
        );
    }
    Ok(Json(body))
}

/// A budget's state: its window, the spend in it and what is left.
fn budget_json(budget_usd: Option<f64>, period: Period, w: &Window, t: &Totals) -> Value {
    let mut v = window_json(period, w);
    if let Some(o) = v.as_object_mut() {
        o.insert("budget_usd".into(), json!(budget_usd));
        o.insert(
            "remaining_usd".into(),
            json!(budget_usd.map(|b| to_usd(to_nanos(b).saturating_sub(t.cost_nanos)))),
        );
    }
    add_totals(&mut v, t);
    v
}

/// `GET /v1/usage` with a user key: its spend this budget period, its
/// budget and what remains, requests and tokens by pool; the same for its
/// team when it has one.
async fn usage(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let Some(directory) = state.inner.directory.as_ref() else {
        return Err(fail(Error::bad_request(
            "GET /v1/usage needs auth.mode = \"required\": with auth off requests have no key \
             to count usage for (the admin sees every spend at /admin/spend)",
        )));
    };
    let key = directory.authenticate(bearer(&headers)).map_err(fail)?;
    let acc = accounts(&state).await?;
    let now = now_ms();
    let w = key.budget_period.window(now);
    let mut totals = Totals::default();
    sum(acc, &acc.subjects.spend(&key.id), &w, |r| totals.add(&r)).await?;
    let mut body = budget_json(key.budget_usd, key.budget_period, &w, &totals);
    if let Some(o) = body.as_object_mut() {
        o.insert("object".into(), json!("usage"));
        o.insert(
            "key".into(),
            json!({ "id": key.id, "name": key.name, "team": key.team, "hint": key.hint }),
        );
    }
    if let Some(name) = &key.team {
        let team = match directory.team(name) {
            Some(team) => {
                let w = team.budget_period.window(now);
                let mut totals = Totals::default();
                sum(acc, &acc.subjects.spend_all(), &w, |r| {
                    if r.team.as_deref() == Some(name.as_str()) {
                        totals.add(&r);
                    }
                })
                .await?;
                let mut t = budget_json(team.budget_usd, team.budget_period, &w, &totals);
                if let Some(o) = t.as_object_mut() {
                    o.insert("name".into(), json!(name));
                }
                t
            }
            None => json!({ "name": name }),
        };
        if let Some(o) = body.as_object_mut() {
            o.insert("team".into(), team);
        }
    }
    Ok(Json(body))
}

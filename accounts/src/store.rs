//! Keys and teams in a JetStream KV bucket (`<prefix>-accounts`): entries
//! `key.<id>` and `team.<name>`, JSON, changed with compare-and-set so
//! two admins never overwrite each other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use optiroute_common::wire::Pool;
use optiroute_common::{Error, ErrorKind};

use crate::model::{validate_budget, validate_limit, validate_name, KeyRecord, Period, TeamRecord};

/// The prefix of every secret: what it is, at a glance and for scanners.
pub const SECRET_PREFIX: &str = "sk-or-";

/// KV operations wait at most this long.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hex SHA-256 of a secret: the only form a key is stored in.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)
        .map_err(|e| Error::internal(format!("no randomness for a key: {e}")))?;
    Ok(hex::encode(buf))
}

pub(crate) fn key_entry(id: &str) -> String {
    format!("key.{id}")
}

pub(crate) fn team_entry(name: &str) -> String {
    format!("team.{name}")
}

/// `POST /admin/keys`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub budget_period: Option<Period>,
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u32>,
    #[serde(default)]
    pub providers: Option<Vec<Pool>>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub end_user_budget_usd: Option<f64>,
}

/// `PATCH /admin/keys/{id}`: a field given replaces the stored one; `null`
/// clears a limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyChanges {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, with = "double_option")]
    pub budget_usd: Option<Option<f64>>,
    #[serde(default)]
    pub budget_period: Option<Period>,
    #[serde(default, with = "double_option")]
    pub rpm: Option<Option<u32>>,
    #[serde(default, with = "double_option")]
    pub tpm: Option<Option<u32>>,
    #[serde(default, with = "double_option")]
    pub providers: Option<Option<Vec<Pool>>>,
    #[serde(default, with = "double_option")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default, with = "double_option")]
    pub end_user_budget_usd: Option<Option<f64>>,
}

/// `POST /admin/teams`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub name: String,
    #[serde(default)]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub budget_period: Option<Period>,
}

/// `PATCH /admin/teams/{name}`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TeamChanges {
    #[serde(default, with = "double_option")]
    pub budget_usd: Option<Option<f64>>,
    #[serde(default)]
    pub budget_period: Option<Period>,
}

/// Tells a field left out (`None`) from one set to `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }
}

fn validate_models(models: Option<&Vec<String>>) -> Result<(), Error> {
    if let Some(ms) = models {
        if ms.len() > 64 {
            return Err(Error::bad_param("models", "at most 64 models"));
        }
        for m in ms {
            optiroute_common::wire::validate_model_id(m).map_err(|e| e.with_param("models"))?;
        }
    }
    Ok(())
}

fn validate_key(k: &KeyRecord) -> Result<(), Error> {
    if k.name.is_empty() || k.name.len() > 128 || k.name.chars().any(char::is_control) {
        return Err(Error::bad_param(
            "name",
            "name must be 1 to 128 bytes of printable text",
        ));
    }
    if let Some(t) = &k.team {
        validate_name("team", t)?;
    }
    validate_budget("budget_usd", k.budget_usd)?;
    validate_budget("end_user_budget_usd", k.end_user_budget_usd)?;
    validate_limit("rpm", k.rpm)?;
    validate_limit("tpm", k.tpm)?;
    if k.providers.as_ref().is_some_and(Vec::is_empty) {
        return Err(Error::bad_param(
            "providers",
            "providers must name at least one pool (leave it out for both)",
        ));
    }
    validate_models(k.models.as_ref())
}

/// A key just made: its record and its secret (shown once).
#[derive(Debug, Clone, Serialize)]
pub struct CreatedKey {
    pub key: String,
    #[serde(flatten)]
    pub record: KeyRecord,
}

/// The accounts bucket.
#[derive(Clone)]
pub struct AccountStore {
    kv: kv::Store,
}

fn kv_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::NatsUnavailable,
        format!("accounts store: {what}: {e}"),
    )
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Error> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| kv_err(what, e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("accounts store: {what}: no answer within {OP_TIMEOUT:?}"),
        )),
    }
}

impl AccountStore {
    /// Opens (or creates) the bucket with `replicas` copies and full history
    /// off: the latest record per key is what counts.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, Error> {
        let kv = match timed("open", js.get_key_value(bucket)).await {
            Ok(kv) => kv,
            Err(_) => {
                let config = kv::Config {
                    bucket: bucket.to_string(),
                    description: "OptiRoute API keys and teams".into(),
                    history: 1,
                    num_replicas: replicas,
                    ..Default::default()
                };
                timed("create", js.create_key_value(config)).await?
            }
        };
        Ok(AccountStore { kv })
    }

    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    async fn read<T: for<'de> Deserialize<'de>>(
        &self,
        entry: &str,
    ) -> Result<Option<(T, u64)>, Error> {
        match timed("read", self.kv.entry(entry)).await? {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = serde_json::from_slice(&e.value).map_err(|err| {
                    Error::internal(format!("stored {entry} is unreadable: {err}"))
                })?;
                Ok(Some((v, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn write<T: Serialize>(
        &self,
        entry: &str,
        v: &T,
        revision: Option<u64>,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(v)
            .map_err(|e| Error::internal(format!("cannot encode {entry}: {e}")))?;
        let r = match revision {
            Some(rev) => timed("update", self.kv.update(entry, body.into(), rev)).await,
            None => timed("create", self.kv.create(entry, body.into())).await,
        };
        r.map(|_| ()).map_err(|e| {
            if e.kind == ErrorKind::NatsUnavailable
                && (e.message.contains("wrong last sequence")
                    || e.message.contains("already exists"))
            {
                Error::new(
                    ErrorKind::BadRequest,
                    format!("{entry} changed meanwhile (or already exists); read it again"),
                )
            } else {
                e
            }
        })
    }

    pub async fn create_key(&self, new: NewKey) -> Result<CreatedKey, Error> {
        if let Some(t) = &new.team {
            validate_name("team", t)?;
            if self.team(t).await?.is_none() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no team `{t}`; create it first (POST /admin/teams)"),
                )
                .with_param("team"));
            }
        }
        let secret = format!("{SECRET_PREFIX}{}", random_hex(24)?);
        let record = KeyRecord {
            id: format!("key_{}", random_hex(8)?),
            name: new.name,
            team: new.team,
            hash: hash_secret(&secret),
            hint: secret.chars().take(SECRET_PREFIX.len() + 4).collect(),
            budget_usd: new.budget_usd,
            budget_period: new.budget_period.unwrap_or_default(),
            rpm: new.rpm,
            tpm: new.tpm,
            providers: new.providers,
            models: new.models,
            end_user_budget_usd: new.end_user_budget_usd,
            created_ms: now_ms(),
            revoked: false,
        };
        validate_key(&record)?;
        self.write(&key_entry(&record.id), &record, None).await?;
        Ok(CreatedKey {
            key: secret,
            record,
        })
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRecord>, Error> {
        validate_name("id", id)?;
        Ok(self.read(&key_entry(id)).await?.map(|(k, _)| k))
    }

    /// Applies `changes` with compare-and-set (retried on a concurrent change).
    pub async fn update_key(&self, id: &str, changes: KeyChanges) -> Result<KeyRecord, Error> {
        self.modify_key(id, |k| {
            if let Some(v) = &changes.name {
                k.name = v.clone();
            }
            if let Some(v) = changes.budget_usd {
                k.budget_usd = v;
            }
            if let Some(v) = changes.budget_period {
                k.budget_period = v;
            }
            if let Some(v) = changes.rpm {
                k.rpm = v;
            }
            if let Some(v) = changes.tpm {
                k.tpm = v;
            }
            if let Some(v) = &changes.providers {
                k.providers = v.clone();
            }
            if let Some(v) = &changes.models {
                k.models = v.clone();
            }
            if let Some(v) = changes.end_user_budget_usd {
                k.end_user_budget_usd = v;
            }
            validate_key(k)
        })
        .await
    }

    /// Revokes a key: it stays listed (its spend is still its own), and
    /// every replica refuses it as soon as the change reaches its watch.
    pub async fn revoke_key(&self, id: &str) -> Result<KeyRecord, Error> {
        self.modify_key(id, |k| {
            k.revoked = true;
            Ok(())
        })
        .await
    }

    async fn modify_key(
        &self,
        id: &str,
        f: impl Fn(&mut KeyRecord) -> Result<(), Error>,
    ) -> Result<KeyRecord, Error> {
        validate_name("id", id)?;
        let entry = key_entry(id);
        for _ in 0..8 {
            let Some((mut k, rev)) = self.read::<KeyRecord>(&entry).await? else {
                return Err(Error::new(ErrorKind::NotFound, format!("no key `{id}`")));
            };
            f(&mut k)?;
            match self.write(&entry, &k, Some(rev)).await {
                Ok(()) => return Ok(k),
                Err(e) if e.kind == ErrorKind::BadRequest => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Overloaded,
            format!("key `{id}` kept changing; try again"),
        ))
    }

    pub async fn keys(&self) -> Result<Vec<KeyRecord>, Error> {
        self.list("key.").await
    }

    pub async fn teams(&self) -> Result<Vec<TeamRecord>, Error> {
        self.list("team.").await
    }

    async fn list<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, Error> {
        let mut names = timed("list", self.kv.keys()).await?;
        let mut wanted = Vec::new();
        while let Some(k) = tokio::time::timeout(OP_TIMEOUT, names.next())
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "accounts store: listing timed out"))?
        {
            let k = k.map_err(|e| kv_err("list", e))?;
            if k.starts_with(prefix) {
                wanted.push(k);
            }
        }
        wanted.sort();
        let mut out = Vec::with_capacity(wanted.len());
        for k in wanted {
            if let Some((v, _)) = self.read(&k).await? {
                out.push(v);
            }
        }
        Ok(out)
    }

    pub async fn create_team(&self, new: NewTeam) -> Result<TeamRecord, Error> {
        validate_name("name", &new.name)?;
        validate_budget("budget_usd", new.budget_usd)?;
        let team = TeamRecord {
            name: new.name,
            budget_usd: new.budget_usd,
            budget_period: new.budget_period.unwrap_or_default(),
            created_ms: now_ms(),
        };
        self.write(&team_entry(&team.name), &team, None)
            .await
            .map_err(|e| {
                if e.kind == ErrorKind::BadRequest {
                    Error::bad_param("name", format!("team `{}` already exists", team.name))
                } else {
                    e
                }
            })?;
        Ok(team)
    }

    pub async fn team(&self, name: &str) -> Result<Option<TeamRecord>, Error> {
        validate_name("name", name)?;
        Ok(self.read(&team_entry(name)).await?.map(|(t, _)| t))
    }

    pub async fn update_team(&self, name: &str, changes: TeamChanges) -> Result<TeamRecord, Error> {
        validate_name("name", name)?;
        let entry = team_entry(name);
        for _ in 0..8 {
            let Some((mut t, rev)) = self.read::<TeamRecord>(&entry).await? else {
                return Err(Error::new(ErrorKind::NotFound, format!("no team `{name}`")));
            };
            if let Some(v) = changes.budget_usd {
                validate_budget("budget_usd", v)?;
                t.budget_usd = v;
            }
            if let Some(v) = changes.budget_period {
                t.budget_period = v;
            }
            match self.write(&entry, &t, Some(rev)).await {
                Ok(()) => return Ok(t),
                Err(e) if e.kind == ErrorKind::BadRequest => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Overloaded,
            format!("team `{name}` kept changing; try again"),
        ))
    }

    /// Deletes a team that no live key belongs to.
    pub async fn delete_team(&self, name: &str) -> Result<(), Error> {
        if self.team(name).await?.is_none() {
            return Err(Error::new(ErrorKind::NotFound, format!("no team `{name}`")));
        }
        let members = self
            .keys()
            .await?
            .into_iter()
            .filter(|k| !k.revoked && k.team.as_deref() == Some(name))
            .count();
        if members > 0 {
            return Err(Error::bad_request(format!(
                "team `{name}` still has {members} live key(s); revoke them first"
            )));
        }
        timed("delete", self.kv.delete(team_entry(name))).await
    }
}

//! The load generator's HTTP client. For `http://` targets it keeps its own
//! pool of HTTP/1.1 connections (hyper's connection API, no URL handling or
//! pool bookkeeping per request): the load generator shares the machine
//! with the stack it measures, so every microsecond it spends is taken from
//! the stack. `https://` targets go through reqwest.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// A finished exchange: status and body, or the failure kind.
pub type Exchange = Result<(u16, Bytes), String>;

pub enum Client {
    Plain(Plain),
    Tls {
        client: reqwest::Client,
        url: String,
        authorization: Option<String>,
    },
}

pub struct Plain {
    /// `host:port` to dial and to send as `Host`.
    authority: String,
    path: String,
    timeout: Duration,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    /// `Bearer <key>`, when requests carry an API key.
    authorization: Option<String>,
}

impl Client {
    pub fn new(url: &str, timeout: Duration, api_key: Option<&str>) -> Result<Client, String> {
        let authorization = api_key.map(|k| format!("Bearer {k}"));
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("--url `{url}`: {e}"))?;
        if parsed.scheme() == "https" {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                .build()
                .map_err(|e| format!("http client: {e}"))?;
            return Ok(Client::Tls {
                client,
                url: url.to_string(),
                authorization,
            });
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("--url `{url}`: no host"))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        let path = match parsed.query() {
            Some(q) => format!("{}?{q}", parsed.path()),
            None => parsed.path().to_string(),
        };
        Ok(Client::Plain(Plain {
            authority: format!("{host}:{port}"),
            path,
            timeout,
            idle: Mutex::new(Vec::new()),
            authorization,
        }))
    }

    /// POSTs a JSON body and reads the whole answer.
    pub async fn post_json(&self, body: String) -> Exchange {
        match self {
            Client::Plain(p) => match tokio::time::timeout(p.timeout, p.post(body)).await {
                Ok(r) => r,
                Err(_) => Err("timeout".into()),
            },
            Client::Tls {
                client,
                url,
                authorization,
            } => {
                let mut req = client.post(url).header("content-type", "application/json");
                if let Some(a) = authorization {
                    req = req.header("authorization", a.as_str());
                }
                let sent = req.body(body).send().await.map_err(|e| reqwest_error(&e))?;
                let status = sent.status().as_u16();
                let b = sent.bytes().await.map_err(|e| reqwest_error(&e))?;
                Ok((status, b))
            }
        }
    }
}

impl Plain {
    async fn post(&self, body: String) -> Exchange {
        let mut req = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "request error".to_string())?;
        let (mut conn, pooled) = match self.idle_conn().await {
            Some(c) => (c, true),
            None => (self.dial().await?, false),
        };
        let resp = match conn.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                // A kept-alive connection the server closed as the request
                // left: it was never sent, so once more on a new connection.
                Some(req) if pooled => {
                    conn = self.dial().await?;
                    conn.send_request(req)
                        .await
                        .map_err(|_| "request error".to_string())?
                }
                _ => return Err("request error".into()),
            },
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| "body error".to_string())?
            .to_bytes();
        self.checkin(conn);
        Ok((status, body))
    }

    /// An idle connection that is still usable.
    async fn idle_conn(&self) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let mut conn = self.idle.lock().ok().and_then(|mut v| v.pop())?;
            if conn.ready().await.is_ok() {
                return Some(conn);
            }
        }
    }

    async fn dial(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(self.authority.as_str())
            .await
            .map_err(|_| "connect error".to_string())?;
        let _ = stream.set_nodelay(true);
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "connect error".to_string())?;
        tokio::spawn(async move {
            // Ends when the connection closes; its error shows on the request.
            let _ = driver.await;
        });
        Ok(conn)
    }

    fn checkin(&self, conn: SendRequest<Full<Bytes>>) {
        if conn.is_closed() {
            return;
        }
        if let Ok(mut v) = self.idle.lock() {
            v.push(conn);
        }
    }
}

fn reqwest_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect error".into()
    } else if e.is_body() || e.is_decode() {
        "body error".into()
    } else {
        "request error".into()
    }
}

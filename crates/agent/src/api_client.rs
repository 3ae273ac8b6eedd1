//! A small client of the REST API: what `mainstay ctl` uses, what an agent
//! uses to call its peers (failsafe confirmations, parameter checks), and
//! what the tests and the lab drive clusters with. It lives beside the API,
//! not inside ctl, so the agent does not depend on the command line's code.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::time::Duration;

/// Why a request got no answer. The URL problems come before anything is
/// sent (ctl reports them as a usage error); `Exchange` says where talking
/// to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url} is not a URL: {source}")]
    BadUrl {
        url: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error("{url}: only http:// and https:// URLs are supported")]
    Scheme { url: String },
    #[error("{url} has no host")]
    NoHost { url: String },
    #[error(
        "{url} uses https: give the CA that signed the API's certificate \
         (--ca-file, or api.ca_file in the configuration)"
    )]
    NoCa { url: String },
    /// The request itself cannot be written, e.g. a credential that is not
    /// a valid header value.
    #[error("{method} {url}: {source}")]
    Request {
        method: Method,
        url: String,
        source: hyper::http::Error,
    },
    #[error("{method} {url}: {failure}")]
    Exchange {
        method: Method,
        url: String,
        #[source]
        failure: ExchangeError,
    },
}

impl ClientError {
    /// Failed before connecting: the URL or the request is at fault, not
    /// the network or the agent asked.
    pub fn before_connecting(&self) -> bool {
        !matches!(self, ClientError::Exchange { .. })
    }
}

/// Where the exchange with the API failed; the messages carry the whole
/// chain of causes (e.g. "connection refused") since ctl prints only this.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connect: {}", error_chain(.0))]
    Connect(#[source] std::io::Error),
    #[error("server name: {}", error_chain(.0))]
    ServerName(#[source] rustls_pki_types::InvalidDnsNameError),
    #[error("TLS: {}", error_chain(.0))]
    Tls(#[source] std::io::Error),
    #[error("HTTP: {}", error_chain(.0))]
    Http(#[source] hyper::Error),
    #[error("reading the answer: {0}")]
    Body(#[source] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One connection per request: ctl and the agents send a handful, and a
/// fresh connection never meets a server-side idle timeout.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    authorization: Option<String>,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// An answer: the status code and the body (JSON when it parses, else text).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub text: String,
    /// The `Date` header: the server's clock, to the second.
    pub date: Option<String>,
}

impl ApiClient {
    /// `base` is e.g. `http://127.0.0.1:8008` (a trailing `/` is ignored).
    pub fn new(base: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            authorization: None,
            timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// Trust the CA certificates in `ca_file` for https:// URLs.
    pub fn with_ca_file(
        mut self,
        ca_file: &std::path::Path,
    ) -> Result<ApiClient, crate::tls::TlsError> {
        self.tls = Some(crate::tls::connector(ca_file)?);
        Ok(self)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// HTTP basic authentication for unsafe methods.
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> ApiClient {
        use base64::Engine;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.authorization = Some(format!("Basic {encoded}"));
        self
    }

    /// A bearer token for unsafe methods.
    pub fn with_token(mut self, token: &str) -> ApiClient {
        self.authorization = Some(format!("Bearer {token}"));
        self
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request(Method::GET, path, None).await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let raw = body.map(|b| b.to_string().into_bytes());
        self.raw(method, path, raw, "application/json").await
    }

    /// Sends `body` as is (tests send malformed JSON with it).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let started = tokio::time::Instant::now();
        let response = self
            .response(method.clone(), path, body, content_type)
            .await?;
        let status = response.status();
        let date = response
            .headers()
            .get(hyper::header::DATE)
            .and_then(|d| d.to_str().ok())
            .map(str::to_string);
        let collect = async {
            response
                .into_body()
                .collect()
                .await
                .map_err(ExchangeError::Body)
        };
        let left = self.timeout.saturating_sub(started.elapsed());
        let bytes = tokio::time::timeout(left, collect)
            .await
            .unwrap_or(Err(ExchangeError::Timeout(self.timeout)))
            .map_err(|failure| ClientError::Exchange {
                method,
                url,
                failure,
            })?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            body,
            text,
            date,
        })
    }

    /// The response's head within the timeout, its body still to be read
    /// (a file, streamed in pieces: memory does not grow with its size).
    pub async fn response(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let target = self.target(path)?;
        let request = self.head(&target, method.clone(), body, content_type, false)?;
        let exchange = async {
            let mut sender = connect(&target).await?;
            sender
                .send_request(request)
                .await
                .map_err(ExchangeError::Http)
        };
        let answered = tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(ExchangeError::Timeout(self.timeout)));
        answered.map_err(|failure| target.failed(method, failure))
    }

    /// Where `path` goes, checked before anything is sent.
    fn target(&self, path: &str) -> Result<Target, ClientError> {
        let url = format!("{}{path}", self.base);
        let uri: hyper::Uri = match url.parse() {
            Ok(uri) => uri,
            Err(source) => return Err(ClientError::BadUrl { url, source }),
        };
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(ClientError::Scheme { url }),
        };
        let Some(host) = uri.host() else {
            return Err(ClientError::NoHost { url });
        };
        let host = host.trim_matches(|c| c == '[' || c == ']').to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone());
        let tls = match (https, &self.tls) {
            (true, None) => return Err(ClientError::NoCa { url }),
            (true, Some(tls)) => Some(tls.clone()),
            (false, _) => None,
        };
        Ok(Target {
            url,
            uri,
            host,
            port,
            authority,
            tls,
        })
    }

    fn head(
        &self,
        target: &Target,
        method: Method,
        body: Option<Vec<u8>>,
        content_type: &str,
        keep_alive: bool,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(target.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, target.authority.as_str());
        if !keep_alive {
            builder = builder.header(hyper::header::CONNECTION, "close");
        }
        if let Some(auth) = &self.authorization {
            builder = builder.header(hyper::header::AUTHORIZATION, auth);
        }
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
        }
        builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Request {
                method,
                url: target.url.clone(),
                source,
            })
    }
}

/// A request's destination, parsed.
struct Target {
    url: String,
    uri: hyper::Uri,
    host: String,
    port: u16,
    authority: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    fn failed(&self, method: Method, failure: ExchangeError) -> ClientError {
        ClientError::Exchange {
            method,
            url: self.url.clone(),
            failure,
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> Result<Sender, ExchangeError> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(ExchangeError::Connect)?;
    // A kept connection sends request after request: no waiting for the
    // peer's delayed ACK before each (Nagle's algorithm).
    let _ = tcp.set_nodelay(true);
    match &target.tls {
        Some(tls) => {
            let name = rustls_pki_types::ServerName::try_from(target.host.clone())
                .map_err(ExchangeError::ServerName)?;
            let stream = tls.connect(name, tcp).await.map_err(ExchangeError::Tls)?;
            handshake(TokioIo::new(stream)).await
        }
        None => handshake(TokioIo::new(tcp)).await,
    }
    .map_err(ExchangeError::Http)
}

async fn handshake<T>(io: T) -> Result<Sender, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One connection kept open to an agent for a caller that sends many
/// requests in a row (a receiver fetching a tree file by file): one TCP
/// and TLS handshake, not one per request. GET only: a request that fails
/// on a connection the server may have closed meanwhile (its idle
/// timeout) is sent once more on a fresh one, which only an idempotent
/// request allows.
pub struct Session {
    client: ApiClient,
    sender: Option<Sender>,
}

impl Session {
    pub fn new(client: ApiClient) -> Session {
        Session {
            client,
            sender: None,
        }
    }

    pub fn base(&self) -> &str {
        self.client.base()
    }

    /// The response's head within the client's timeout, its body still to
    /// be read. Read it to the end before the next request, or the
    /// connection cannot be used again (the next request then opens one).
    pub async fn get(
        &mut self,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let target = self.client.target(path)?;
        let timeout = self.client.timeout;
        if let Some(mut sender) = self.sender.take() {
            // Ready once the previous response was read to its end.
            let ready = tokio::time::timeout(Duration::from_millis(200), sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                let request = self.client.head(&target, Method::GET, None, "", true)?;
                match tokio::time::timeout(timeout, sender.send_request(request)).await {
                    Ok(Ok(response)) => {
                        self.sender = Some(sender);
                        return Ok(response);
                    }
                    Ok(Err(_)) => {}
                    Err(_) => {
                        return Err(target.failed(Method::GET, ExchangeError::Timeout(timeout)));
                    }
                }
            }
        }
        let request = self.client.head(&target, Method::GET, None, "", true)?;
        let exchange = async {
            let mut sender = connect(&target).await?;
            let response = sender
                .send_request(request)
                .await
                .map_err(ExchangeError::Http)?;
            Ok((sender, response))
        };
        let (sender, response) = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(ExchangeError::Timeout(timeout)))
            .map_err(|failure| target.failed(Method::GET, failure))?;
        self.sender = Some(sender);
        Ok(response)
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn url_problems_are_found_before_connecting() {
        let err = ApiClient::new("ftp://x").get("/").await.unwrap_err();
        assert!(err.before_connecting());
        assert_eq!(
            err.to_string(),
            "ftp://x/: only http:// and https:// URLs are supported"
        );
        let err = ApiClient::new("https://x:1").get("/").await.unwrap_err();
        assert!(matches!(err, ClientError::NoCa { .. }), "{err:?}");
        assert!(err.to_string().contains("--ca-file"), "{err}");
    }

    #[tokio::test]
    async fn exchange_failures_say_where_and_keep_their_cause() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // Accepted and never answered.
        let client = ApiClient::new(&url).with_timeout(Duration::from_millis(200));
        let err = client.get("/patroni").await.unwrap_err();
        assert!(!err.before_connecting());
        assert_eq!(
            err.to_string(),
            format!("GET {url}/patroni: no answer within 200ms")
        );
        drop(listener);
        let err = client.get("/patroni").await.unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Exchange {
                    failure: ExchangeError::Connect(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("GET {url}/patroni: connect: ")),
            "{err}"
        );
        let cause = std::error::Error::source(&err).and_then(|e| e.source());
        assert!(cause.is_some_and(|io| io.is::<std::io::Error>()), "{err:?}");
    }
}

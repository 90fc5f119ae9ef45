//! How a repository is authorized: what its first, anonymous read (the
//! probe) learnt of how it wants to be read, the `Authorization` header
//! for Basic auth or a Bearer token, and the token requests (cached per
//! realm, service and scope until they expire, renewed once when the
//! registry refuses one).
//!
//! Kept apart from the reads and uploads that use it because it is the one
//! place credentials are handled: none is ever put in a message.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use reqwest::Response;

use crate::credentials::Credential;
use crate::remote::auth::{
    basic_header, may_send_credentials, parse_challenges, query_escape, token_lifetime, Challenge,
    Token,
};
use crate::remote::redact_url;

use super::{
    read_limited, repo_key, status_failure, transport_failure, with_suffix, Failure, Registry,
    RepoAuth,
};

impl Registry {
    /// How `url`'s repository authenticates, if a read has found out.
    pub(super) fn known_repo_auth(&self, url: &str) -> Option<RepoAuth> {
        self.state().repos.get(repo_key(url)).cloned()
    }

    /// `url`'s repository answered an anonymous read.
    pub(super) fn set_repo_anonymous(&self, url: &str) {
        self.state()
            .repos
            .insert(repo_key(url).to_string(), RepoAuth::Anonymous);
    }

    pub(super) fn set_repo_auth(&self, url: &str, challenge: Challenge) -> RepoAuth {
        let auth = match challenge {
            Challenge::Basic => RepoAuth::Basic,
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => RepoAuth::Bearer {
                realm,
                service,
                scope: scope.or_else(|| default_scope(url)),
            },
        };
        self.state()
            .repos
            .insert(repo_key(url).to_string(), auth.clone());
        auth
    }

    fn credential(&self, url: &str) -> io::Result<Option<Credential>> {
        self.credentials.lookup(url)
    }

    /// The `Authorization` value for a request to `url`; `renew` forces a
    /// new token.
    pub(super) async fn authorization(
        &self,
        url: &str,
        auth: &RepoAuth,
        renew: bool,
    ) -> std::result::Result<Option<String>, Failure> {
        match auth {
            RepoAuth::Anonymous => Ok(None),
            // The probe already read anonymously and was refused: say why
            // the credentials are not sent rather than be refused again.
            RepoAuth::Basic if !may_send_credentials(url) => Err(Failure::fatal(
                libc::EPERM,
                format!(
                    "{}: the registry wants a user name and password (Basic auth); obd sends credentials only over https, or plain http to a loopback address, and reading anonymously was refused",
                    redact_url(url)
                ),
            )),
            RepoAuth::Basic => match self.credential(url)? {
                Some(credential) => Ok(Some(basic_header(&credential))),
                None => Err(Failure::fatal(
                    libc::EPERM,
                    format!(
                        "{}: the registry wants a user name and password (Basic auth) and no credential matches this repository",
                        redact_url(url)
                    ),
                )),
            },
            RepoAuth::Bearer {
                realm,
                service,
                scope,
            } => {
                let key = format!(
                    "{realm} {} {}",
                    service.as_deref().unwrap_or(""),
                    scope.as_deref().unwrap_or("")
                );
                if !renew {
                    if let Some(token) = self.state().tokens.get(&key) {
                        if token.expires > Instant::now() {
                            return Ok(Some(format!("Bearer {}", token.value)));
                        }
                    }
                }
                let token = self
                    .fetch_token(url, realm, service.as_deref(), scope.as_deref())
                    .await?;
                let header = format!("Bearer {}", token.value);
                self.state().tokens.insert(key, token);
                Ok(Some(header))
            }
        }
    }

    async fn fetch_token(
        &self,
        url: &str,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> std::result::Result<Token, Failure> {
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(format!("service={}", query_escape(service)));
        }
        if let Some(scope) = scope {
            query.push(format!("scope={}", query_escape(scope)));
        }
        let separator = if realm.contains('?') { '&' } else { '?' };
        let token_url = if query.is_empty() {
            realm.to_string()
        } else {
            format!("{realm}{separator}{}", query.join("&"))
        };
        let realm_ok = url::Url::parse(realm).is_ok_and(|r| matches!(r.scheme(), "http" | "https"));
        if !realm_ok {
            return Err(Failure::fatal(
                libc::EPERM,
                format!(
                    "{}: the registry's token realm {:?} is not an http(s) URL",
                    redact_url(url),
                    redact_url(realm)
                ),
            ));
        }
        let mut request = self.client.get(&token_url);
        // Credentials go to the realm the registry named, and only over
        // https (or to loopback); otherwise ask for an anonymous token.
        if may_send_credentials(realm) {
            if let Some(credential) = self.credential(url)? {
                request = request.header("Authorization", basic_header(&credential));
            }
        } else if self.state().warned.insert(realm.to_string()) {
            eprintln!(
                "obd: token server {} is plain http and not a loopback address: asking it for a token without credentials",
                redact_url(realm)
            );
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = request
            .send()
            .await
            .map_err(|e| transport_failure(e, "token request to", realm))?;
        let status = response.status().as_u16();
        if status != 200 {
            let mut failure = status_failure(&response, realm);
            failure.error = with_suffix(
                failure.error,
                &format!(" (token server, for {})", redact_url(url)),
            );
            return Err(failure);
        }
        let text = read_limited(response, 1 << 20).await.map_err(|why| {
            Failure::retry(
                libc::EIO,
                format!("token from {}: {why}", redact_url(realm)),
            )
        })?;
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let bad = |what: &str| {
            Failure::fatal(
                libc::EPERM,
                format!("token server {}: {what}", redact_url(realm)),
            )
        };
        let answer: Answer =
            serde_json::from_slice(&text).map_err(|_| bad("the answer is not a token (JSON)"))?;
        let value = answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| bad("the answer has neither `token` nor `access_token`"))?;
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the token holds characters a header cannot carry"));
        }
        Ok(Token {
            value,
            expires: Instant::now() + token_lifetime(answer.expires_in),
        })
    }
}

/// `repository:<name>:pull` for a `/v2/<name>/blobs/...` URL.
fn default_scope(url: &str) -> Option<String> {
    let key = repo_key(url);
    let path = key.split_once("/v2/")?.1;
    let name = path
        .strip_suffix("/blobs")
        .or_else(|| path.strip_suffix("/manifests"))?;
    (!name.is_empty()).then(|| format!("repository:{name}:pull"))
}

pub(super) fn challenge_of(response: &Response) -> Option<Challenge> {
    parse_challenges(
        response
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::auth::CredentialSource;
    use crate::remote::registry::RegistryOptions;

    /// A source that must not be asked.
    struct Untouchable;

    impl CredentialSource for Untouchable {
        fn lookup(&self, url: &str) -> io::Result<Option<Credential>> {
            panic!("credentials were looked up for {url}");
        }
    }

    #[test]
    fn basic_is_not_sent_over_plain_http_to_other_hosts() {
        let registry =
            Registry::with_credentials(RegistryOptions::default(), Box::new(Untouchable));
        for url in [
            "http://registry.example.com/v2/a/blobs/sha256:1",
            "http://10.1.2.3:5000/v2/a/blobs/sha256:1",
        ] {
            let result = crate::remote::registry::block_on(registry.authorization(
                url,
                &RepoAuth::Basic,
                false,
            ));
            let Err(failure) = result else {
                panic!("{url}: Basic credentials would be sent");
            };
            let msg = failure.error.to_string();
            assert!(!failure.retry);
            assert!(
                msg.contains("only over https, or plain http to a loopback address"),
                "{msg}"
            );
        }
    }

    #[test]
    fn default_scopes() {
        let url = "https://r.example.com/v2/ns/app/blobs/sha256:ab";
        assert_eq!(
            default_scope(url).as_deref(),
            Some("repository:ns/app:pull")
        );
        assert_eq!(default_scope("http://h/other"), None);
        assert_eq!(
            default_scope("http://h/v2/ns/app/manifests/v1").as_deref(),
            Some("repository:ns/app:pull")
        );
    }
}

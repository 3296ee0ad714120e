//! `sluice-proto`: the `sluice.v1` wire types and gRPC services.
//!
//! The `.proto` files next to this crate are the source of truth; this crate
//! includes what `build.rs` generates from them, the rollout [`codec`], and
//! what every server and client shares (auth, TLS, the shutdown signal).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

pub mod codec;
pub mod events;
pub mod jobs;
pub mod serve;

pub use serve::Channel;


/// Packed little-endian arrays, the encoding of `Rollout`'s token, log-prob and
/// mask fields.
pub mod packed {
    use prost::bytes::Bytes;

    /// Token ids (each must fit in u32) as 4-byte little-endian bytes.
    pub fn tokens(ids: &[i64]) -> Bytes {
        ids.iter().flat_map(|&t| (t as u32).to_le_bytes()).collect::<Vec<u8>>().into()
    }

    /// Token ids from 4-byte little-endian bytes; None when the length is not a multiple of 4.
    pub fn tokens_from(bytes: &[u8]) -> Option<Vec<i64>> {
        bytes.len().is_multiple_of(4).then(|| {
            bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
        })
    }

    pub fn floats(values: &[f32]) -> Bytes {
        values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }

    /// Floats from 4-byte little-endian bytes; None when the length is not a multiple of 4.
    pub fn floats_from(bytes: &[u8]) -> Option<Vec<f32>> {
        bytes.len().is_multiple_of(4).then(|| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn mask(values: &[bool]) -> Bytes {
        values.iter().map(|&m| u8::from(m)).collect::<Vec<u8>>().into()
    }

    /// Mask from one byte per token; None when a byte is not 0 or 1.
    pub fn mask_from(bytes: &[u8]) -> Option<Vec<bool>> {
        bytes.iter().map(|&b| matches!(b, 0 | 1).then_some(b == 1)).collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_refuses_ragged_input() {
            assert_eq!(super::tokens_from(&super::tokens(&[0, 7, 151_935])), Some(vec![0, 7, 151_935]));
            assert_eq!(super::floats_from(&super::floats(&[-0.5, f32::MIN])), Some(vec![-0.5, f32::MIN]));
            assert_eq!(super::mask_from(&super::mask(&[true, false])), Some(vec![true, false]));
            assert_eq!(super::tokens_from(&[1, 2, 3]), None);
            assert_eq!(super::mask_from(&[2]), None);
        }
    }
}

/// Bearer-token authentication shared by every sluice server and client.
///
/// A server started with a token refuses each call of its sluice service that
/// does not carry `authorization: Bearer <token>` with `UNAUTHENTICATED` (gRPC
/// health stays open for probes). Clients add the header with [`auth::request`].
/// Without a token nothing is checked: the default for one machine.
pub mod auth {
    use tonic::metadata::MetadataValue;
    use tonic::{Request, Status};

    /// The header value for `token`.
    fn bearer(token: &str) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        format!("Bearer {token}").parse().ok()
    }

    /// `message` as a request that carries `token` (when there is one).
    pub fn request<T>(message: T, token: Option<&str>) -> Request<T> {
        let mut req = Request::new(message);
        if let Some(value) = token.and_then(bearer) {
            req.metadata_mut().insert("authorization", value);
        }
        req
    }

    /// Compares in time independent of where the strings differ.
    pub fn same(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// A tonic interceptor that checks the bearer token (or nothing, without one).
    #[derive(Clone, Debug)]
    pub struct Check {
        expected: Option<Vec<u8>>,
    }

    impl Check {
        pub fn new(token: Option<&str>) -> Self {
            Check { expected: token.map(|t| t.as_bytes().to_vec()) }
        }
    }

    impl tonic::service::Interceptor for Check {
        fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
            let Some(expected) = &self.expected else { return Ok(req) };
            match req.metadata().get("authorization") {
                // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
                Some(v) if v.as_bytes().get(..7).is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "))
                    && same(&v.as_bytes()[7..], expected) =>
                {
                    Ok(req)
                }
                Some(_) => Err(Status::unauthenticated("wrong bearer token")),
                None => Err(Status::unauthenticated("this server needs `authorization: Bearer <token>` (SLUICE_TOKEN)")),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use tonic::service::Interceptor;

        #[test]
        fn tokens_are_checked_only_when_configured() {
            let to_unit = |r: Request<u8>| r.map(|_| ());
            let mut open = Check::new(None);
            assert!(open.call(to_unit(request(1u8, None))).is_ok());
            let mut closed = Check::new(Some("s3cret"));
            let lower = {
                let mut r = Request::new(());
                r.metadata_mut().insert("authorization", "bearer s3cret".parse().unwrap());
                r
            };
            assert!(closed.call(lower).is_ok(), "the scheme is case-insensitive");
            assert!(closed.call(to_unit(request(1u8, Some("s3cret")))).is_ok());
            let wrong = closed.call(to_unit(request(1u8, Some("guess")))).unwrap_err();
            assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
            let missing = closed.call(to_unit(request(1u8, None))).unwrap_err();
            assert!(missing.message().contains("SLUICE_TOKEN"), "{missing}");
        }
    }
}

/// TLS for sluice's gRPC servers and clients (rustls), from PEM files.
///
/// A server given a certificate chain and key serves only TLS; a client
/// given a CA certificate trusts servers signed by it (and nothing else) and
/// must use an `https://` endpoint. Without files, plain HTTP/2: the default on
/// one machine.
pub mod tls {
    use std::path::{Path, PathBuf};

    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

    fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("TLS {what} {}: {e}", path.display()))
    }

    /// A server's certificate chain and private key (PEM).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ServerFiles {
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    impl ServerFiles {
        /// Both files or neither; one alone is a mistake worth naming.
        pub fn from_options(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<Self>, String> {
            match (cert, key) {
                (Some(cert), Some(key)) => Ok(Some(ServerFiles { cert, key })),
                (None, None) => Ok(None),
                (Some(_), None) => Err("--tls-cert needs --tls-key (SLUICE_TLS_KEY)".into()),
                (None, Some(_)) => Err("--tls-key needs --tls-cert (SLUICE_TLS_CERT)".into()),
            }
        }

        pub fn config(&self) -> Result<ServerTlsConfig, String> {
            let identity = Identity::from_pem(read("certificate", &self.cert)?, read("key", &self.key)?);
            Ok(ServerTlsConfig::new().identity(identity))
        }
    }

    /// A client's trust: the CA certificate (PEM) that signed the servers.
    pub fn client_config(ca: &Path) -> Result<ClientTlsConfig, String> {
        Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA certificate", ca)?)))
    }
}

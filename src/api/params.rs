//! One discipline for what clients send the admin API: an unknown value of an
//! enum-valued filter is a 400 listing the valid ones ([`unknown_value`]), a
//! malformed query parameter is a 400 in one message form ([`describe`]), and
//! POST actions whose body is optional accept none at all ([`OptionalJson`]).

use poem::{Request, RequestBody};
use poem_openapi::error::{ContentTypeError, ParseParamError, ParseRequestPayloadError};
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::ParseFromJSON;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use super::error::ApiError;

/// 400 for a query parameter, in the one form every parameter error takes:
/// "invalid query parameter `NAME`: expected WHAT (got `VALUE`)".
pub fn invalid(param: &str, expected: &str, got: &str) -> ApiError {
    ApiError::bad_request(format!(
        "invalid query parameter `{param}`: expected {expected} (got `{got}`)"
    ))
}

/// 400 for a filter value outside its set, naming the valid ones.
pub fn unknown_value(param: &str, value: &str, valid: &[&str]) -> ApiError {
    invalid(param, &format!("one of {}", valid.join(", ")), value)
}

/// 400 for a `cursor` that is not a `next_cursor` this API gave out.
pub fn bad_cursor(got: &str) -> ApiError {
    invalid(
        "cursor",
        "the `next_cursor` of a previous page, unchanged",
        got,
    )
}

/// What each typed query parameter expects, in words.
fn expected(name: &str, reason: &str) -> String {
    match name {
        "limit" => "an integer from 1 to 500".to_owned(),
        "as_of" => "a log sequence number (a whole number, e.g. 42)".to_owned(),
        "received_after" | "received_before" => {
            "an RFC 3339 instant, e.g. 2026-01-31T12:00:00Z".to_owned()
        }
        "order" => "one of newest_first, oldest_first".to_owned(),
        _ if reason.contains("integer") => "an integer".to_owned(),
        _ => reason.to_owned(),
    }
}

/// The message for a query parameter poem-openapi could not parse or
/// validate (instead of the parser's own words, e.g. "invalid digit found in string").
pub fn describe(err: &poem::Error) -> Option<String> {
    let e = err.downcast_ref::<ParseParamError>()?;
    Some(format!(
        "invalid query parameter `{}`: expected {}",
        e.name,
        expected(e.name, &e.reason)
    ))
}

/// The message for a request body without `Content-Type` where the operation needs one.
pub fn describe_media(err: &poem::Error) -> Option<String> {
    match err.downcast_ref::<ContentTypeError>()? {
        ContentTypeError::ExpectContentType => Some(
            "this operation needs a JSON body: send `Content-Type: application/json` and a JSON \
             object (`{}` when every field is left to its default)"
                .to_owned(),
        ),
        _ => None,
    }
}

/// A JSON request body that may be left out: no body (with or without a
/// `Content-Type`), or an empty one, is `None`; anything else must be JSON.
pub struct OptionalJson<T>(pub Option<T>);

impl<'a, T: ParseFromJSON> ApiExtractor<'a> for OptionalJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: "application/json; charset=utf-8",
                schema: T::schema_ref(),
            }],
            required: false,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let data = body.take()?.into_vec().await?;
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if let Some(content_type) = request.content_type()
            && !is_json(content_type)
        {
            return Err(ContentTypeError::NotSupported {
                content_type: content_type.to_owned(),
            }
            .into());
        }
        let value: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| ParseRequestPayloadError {
                reason: e.to_string(),
            })?;
        let parsed = T::parse_from_json(Some(value)).map_err(|e| ParseRequestPayloadError {
            reason: e.into_message(),
        })?;
        Ok(Self(Some(parsed)))
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

//! Dialects: what differs between the providers Keel reaches, in one place.
//!
//! A provider is a wire format (the request, answer and stream events: OpenAI's chat
//! completions or Anthropic's messages, [`Wire`]) plus how it is addressed and
//! authenticated: the path of a chat call and of embeddings, the auth header, fixed
//! headers, and what its config must say. Adding a provider that speaks an existing
//! wire format touches this file and [`Provider`]'s list only.
//!
//! - `openai`: any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, Groq,
//!   OpenRouter, Gemini's OpenAI endpoint): `{base_url}/chat/completions`,
//!   `Authorization: Bearer`.
//! - `anthropic`: `{base_url}/messages`, `x-api-key`, `anthropic-version`.
//! - `azure`: Azure OpenAI: `{base_url}/openai/deployments/{model}/chat/completions?api-version=…`
//!   (`model` is the deployment's name, `api_version` required), `api-key` header; the
//!   OpenAI wire format (its chunks with empty `choices`, such as
//!   `prompt_filter_results`, are skipped by the stream parser like any other).

use http::header::{AUTHORIZATION, HeaderName};

use crate::config::{ModelConfig, Provider};

/// The request, answer and stream format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// OpenAI's chat completions.
    OpenAi,
    /// Anthropic's messages, translated both ways.
    Anthropic,
}

impl Provider {
    /// Its wire format.
    pub(crate) fn wire(self) -> Wire {
        match self {
            Provider::Openai | Provider::Azure => Wire::OpenAi,
            Provider::Anthropic => Wire::Anthropic,
        }
    }

    /// Its name in traces (`gen_ai.provider.name`, OpenTelemetry's values).
    pub(crate) fn trace_name(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Azure => "azure.ai.openai",
        }
    }

    /// The URL of a chat call.
    pub(crate) fn chat_url(self, config: &ModelConfig) -> String {
        let base = config.base_url.trim_end_matches('/');
        match self {
            Provider::Openai => format!("{base}/chat/completions"),
            Provider::Anthropic => format!("{base}/messages"),
            Provider::Azure => azure_url(config, "chat/completions"),
        }
    }

    /// The URL of an embeddings call, for a provider that has one.
    pub(crate) fn embeddings_url(self, config: &ModelConfig) -> Option<String> {
        match self {
            Provider::Openai => Some(format!("{}/embeddings", config.base_url.trim_end_matches('/'))),
            Provider::Azure => Some(azure_url(config, "embeddings")),
            Provider::Anthropic => None,
        }
    }

    /// The header carrying the upstream's key, and its value.
    pub(crate) fn auth(self, key: String) -> (HeaderName, String) {
        match self {
            Provider::Openai => (AUTHORIZATION, format!("Bearer {key}")),
            Provider::Anthropic => (HeaderName::from_static("x-api-key"), key),
            Provider::Azure => (HeaderName::from_static("api-key"), key),
        }
    }

    /// Headers every request carries.
    pub(crate) fn fixed_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Provider::Anthropic => &[("anthropic-version", crate::wire::anthropic::VERSION)],
            Provider::Openai | Provider::Azure => &[],
        }
    }

    /// What model `name`'s config must say for this provider.
    pub(crate) fn check(self, name: &str, config: &ModelConfig) -> Vec<String> {
        let mut problems = Vec::new();
        let version = config.api_version.as_deref();
        match self {
            Provider::Azure => match version {
                None => problems.push(format!(
                    "models.{name}.api_version: an azure model needs the API version, e.g. \"2024-10-21\""
                )),
                Some(v) if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                    problems.push(format!(
                        "models.{name}.api_version: `{v}` is not an API version (e.g. \"2024-10-21\")"
                    ))
                }
                Some(_) => {}
            },
            Provider::Openai | Provider::Anthropic => {
                if version.is_some() {
                    problems
                        .push(format!("models.{name}.api_version: only an azure model has an API version"));
                }
            }
        }
        if self == Provider::Azure
            && (config.model.is_empty()
                || config.model.contains(['/', '?', '#', '%'])
                || config.model.contains(".."))
        {
            problems.push(format!(
                "models.{name}.model: `{}` is not a deployment name (letters, digits, `-`, `_`, `.`)",
                config.model
            ));
        }
        problems
    }
}

fn azure_url(config: &ModelConfig, what: &str) -> String {
    format!(
        "{}/openai/deployments/{}/{what}?api-version={}",
        config.base_url.trim_end_matches('/'),
        config.model,
        config.api_version.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_is_addressed_by_deployment_and_api_version_with_its_own_key_header() {
        let mut c = ModelConfig::new(Provider::Azure, "https://acme.openai.azure.com/", "gpt4o-prod");
        assert!(!Provider::Azure.check("a", &c).is_empty(), "the API version is required");
        c.api_version = Some("2024-10-21".into());
        assert!(Provider::Azure.check("a", &c).is_empty());
        assert_eq!(
            Provider::Azure.chat_url(&c),
            "https://acme.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            Provider::Azure.embeddings_url(&c).unwrap(),
            "https://acme.openai.azure.com/openai/deployments/gpt4o-prod/embeddings?api-version=2024-10-21"
        );
        assert_eq!(Provider::Azure.auth("k".into()).0.as_str(), "api-key");
        assert_eq!(Provider::Azure.wire(), Wire::OpenAi);
        c.model = "../other".into();
        assert!(!Provider::Azure.check("a", &c).is_empty(), "a deployment name cannot leave its path");
        c.api_version = Some("2024-10-21&x=1".into());
        assert!(Provider::Azure.check("a", &c).iter().any(|p| p.contains("api_version")));
        let mut o = ModelConfig::new(Provider::Openai, "http://h/v1", "m");
        o.api_version = Some("1".into());
        assert!(!Provider::Openai.check("o", &o).is_empty(), "an API version elsewhere is a mistake");
    }
}

//! The real model server of the `openai` engine's tests (`gantry_tests::llm`): it starts,
//! completes a chat, and decodes greedily the same way twice.

use gantry_tests::llm::{LlmServer, MODEL_NAME};
use serde_json::json;

#[tokio::test]
async fn the_model_server_completes_a_chat_the_same_way_twice() -> anyhow::Result<()> {
    let server = LlmServer::start().await?;
    let request = json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "seed": 1,
    });

    let mut texts = Vec::new();
    for _ in 0..2 {
        let answer = server.post_json("/v1/chat/completions", &request).await?;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let answer = answer.json()?;
        let choice = &answer["choices"][0];
        assert!(choice["finish_reason"].is_string(), "{answer}");
        assert!(
            answer["usage"]["completion_tokens"].as_u64() >= Some(1),
            "{answer}"
        );
        texts.push(choice["message"]["content"].clone());
    }
    assert!(texts[0].is_string(), "{texts:?}");
    assert_eq!(texts[0], texts[1], "greedy decoding differed");
    Ok(())
}

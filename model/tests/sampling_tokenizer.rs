//! Real chat templates (Qwen2.5-Instruct, Meta-Llama-3-Instruct) rendered as
//! transformers' `apply_chat_template(..., tokenize=False)` would.

use model::tokenizer::{ChatMessage, ChatTemplate, Tokenizer, char_level};
use serde_json::json;

const QWEN25: &str = include_str!("fixtures/tokenizer/qwen2.5_chat_template.jinja");
const LLAMA3: &str = include_str!("fixtures/tokenizer/llama3_chat_template.jinja");

const QWEN_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";

fn qwen() -> ChatTemplate {
    ChatTemplate::new(QWEN25, None, Some("<|im_end|>".into())).unwrap()
}

#[test]
fn qwen25_system_and_user() {
    let msgs = json!([
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "What is 2+2?"},
    ]);
    let body = "<|im_start|>system\nYou are a math tutor.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    assert_eq!(qwen().render(&msgs, false).unwrap(), body);
    assert_eq!(
        qwen().render(&msgs, true).unwrap(),
        format!("{body}<|im_start|>assistant\n")
    );
}

#[test]
fn qwen25_default_system_prompt_and_multi_turn() {
    let msgs = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]);
    assert_eq!(
        qwen().render(&msgs, true).unwrap(),
        format!(
            "{QWEN_DEFAULT_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
             <|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        )
    );
}

#[test]
fn qwen25_tools_tool_calls_and_tool_responses() {
    // Keys in sorted order so that the expected JSON does not depend on
    // serde_json's preserve_order feature.
    let tools = json!([{
        "function": {
            "description": "Get the weather",
            "name": "get_weather",
            "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"},
        },
        "type": "function",
    }]);
    let msgs = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ]},
        {"role": "tool", "content": "22C"},
        {"role": "tool", "content": "sunny"},
    ]);
    let expected = concat!(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        r#"{"function": {"description": "Get the weather", "name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}, "type": "function"}"#,
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
        "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\nsunny\n</tool_response><|im_end|>\n",
        "<|im_start|>assistant\n",
    );
    let out = qwen().render_with(&msgs, true, Some(&tools), None).unwrap();
    assert_eq!(out, expected);
}

#[test]
fn llama3_template_uses_bos_and_trims_content() {
    let t = ChatTemplate::new(
        LLAMA3,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let msgs = json!([
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "  Hi!  \n"},
    ]);
    let body = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>\
                <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>";
    assert_eq!(t.render(&msgs, false).unwrap(), body);
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        format!("{body}<|start_header_id|>assistant<|end_header_id|>\n\n")
    );
}

#[test]
fn folder_with_named_templates_and_added_token_objects() {
    // tokenizer_config.json may hold a list of named templates; "default" is used.
    let dir = tempfile::tempdir().unwrap();
    let base = char_level(
        "abcdefghijklmnopqrstuvwxyz !?\n",
        &["<|begin_of_text|>", "<|eot_id|>"],
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), base.tokenizer_json()).unwrap();
    let config = json!({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": "<|eot_id|>",
        "chat_template": [
            {"name": "tool_use", "template": "unused"},
            {"name": "default", "template": LLAMA3},
        ],
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.bos_token_id(), Some(0));
    assert_eq!(t.eos_token_id(), Some(1));
    assert_eq!(t.chat_template(), Some(LLAMA3));
    let out = t
        .apply_chat_template(&[ChatMessage::user("hi")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn chat_template_kwargs_reach_the_template() {
    let t = ChatTemplate::new(
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>{% endif %}{{ messages|length }}",
        None,
        None,
    )
    .unwrap();
    let kwargs = json!({"enable_thinking": false});
    let out = t
        .render_with(
            &json!([{"role": "user", "content": "x"}]),
            true,
            None,
            kwargs.as_object(),
        )
        .unwrap();
    assert_eq!(out, "<think>\n\n</think>1");
    assert!(t.render(&json!({"role": "user"}), true).is_err());
}

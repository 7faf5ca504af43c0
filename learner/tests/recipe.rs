//! The recipe parser: unknown keys with a suggestion, wrong types, overrides,
//! versions, the shipped recipes, and the resolved output.

use std::path::{Path, PathBuf};

use learner::grpo_config::LossType;
use learner::recipe::{
    ClientTagEcho, DataFile, EnvironmentFactory, LrSchedulerType, ModelPreset, OnLongPrompt,
    Recipe, RecipeError, StepInterval,
};

const NO_OVERRIDES: &[&str] = &[];

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// A small valid recipe.
const BASE: &str = r#"
version: 1
model:
  preset: tiny
data:
  train_files: [train.jsonl]
reward:
  functions:
    - name: exact_match
train:
  learning_rate: 1.0e-3
  per_device_train_batch_size: 16
"#;

fn err(text: &str, overrides: &[&str]) -> String {
    match Recipe::from_yaml_str(text, "demo.yaml", overrides) {
        Ok(r) => panic!("expected an error, got {r:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_key_names_the_path_and_the_closest_key() {
    let text = BASE.replace("learning_rate:", "learning_rat:");
    let e = err(&text, NO_OVERRIDES);
    assert_eq!(
        e,
        "unknown key train.learning_rat in demo.yaml; did you mean train.learning_rate?"
    );

    // A key of another section.
    let text = format!("{BASE}  temperature: 0.7\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("unknown key train.temperature"), "{e}");
    assert!(e.contains("did you mean rollout.temperature?"), "{e}");

    // A flattened GRPO knob with a typo: serde alone would not see it.
    let text = format!("{BASE}  epsilon_hihg: 0.28\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("did you mean train.epsilon_high?"), "{e}");

    // A key outside its section.
    let text = format!("{BASE}max_steps: 3\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("did you mean train.max_steps?"), "{e}");
    // ... also a free-form map's (TRL keeps these in GRPOConfig).
    let text = format!("{BASE}  chat_template_kwargs: {{enable_thinking: false}}\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("did you mean data.chat_template_kwargs?"), "{e}");

    // A misspelled section.
    let text = format!("{BASE}evl:\n  eval_steps: 3\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("unknown key evl") && e.contains("did you mean eval?"),
        "{e}"
    );

    // Inside a list of files.
    let text = BASE.replace("[train.jsonl]", "[{pth: train.jsonl}]");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("data.train_files[0].pth") && e.contains("data.train_files[0].path"),
        "{e}"
    );

    // A TRL / open-r1 key with another name, or none, in Tandem.
    let text = format!("{BASE}  use_liger_loss: true\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("train.recompute_logits"), "{e}");
    let text = format!("{BASE}  use_liger_kernel: true\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("Liger's kernels"), "{e}");
    // TRL's newer loss types and their knobs parse; a bad temperature names
    // its key.
    let text = format!("{BASE}  loss_type: sapo\n  sapo_temperature_neg: 1.2\n");
    let r = Recipe::from_yaml_str(&text, "demo.yaml", NO_OVERRIDES).unwrap();
    assert_eq!(r.train.loss.loss_type, LossType::Sapo);
    assert_eq!(r.train.loss.sapo_temperature_neg, 1.2);
    let r = Recipe::from_yaml_str(BASE, "demo.yaml", &["train.loss_type=cispo"]).unwrap();
    assert_eq!(r.train.loss.loss_type, LossType::Cispo);
    let e = err(BASE, &["train.sapo_temperature_pos=0"]);
    assert!(e.contains("sapo_temperature_pos"), "{e}");
    // TRL's report_to: a string or a list; online trackers are refused.
    let text = format!("{BASE}log:\n  report_to: tensorboard\n");
    let r = Recipe::from_yaml_str(&text, "demo.yaml", NO_OVERRIDES).unwrap();
    assert!(r.log.tensorboard());
    let e = err(BASE, &["log.report_to=[wandb]"]);
    assert!(e.contains("log.report_to") && e.contains("wandb"), "{e}");
    let text = format!("report_to: none\n{BASE}");
    assert!(err(&text, NO_OVERRIDES).contains("log.report_to"));
    // open-r1's `gradient_checkpointing: true` at the top level.
    let text = format!("gradient_checkpointing: true\n{BASE}");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("did you mean train.gradient_checkpointing?"),
        "{e}"
    );
    let e = err(
        BASE,
        &[
            "train.gradient_checkpointing=true",
            "train.recompute_logits=false",
        ],
    );
    assert!(
        e.contains("train.gradient_checkpointing") && e.contains("recompute_logits: true"),
        "{e}"
    );
    let text = format!("{BASE}  gradient_checkpointing_kwargs: {{use_reentrant: false}}\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("not needed"), "{e}");
    let e = err(
        BASE,
        &[
            "train.steps_per_generation=3",
            "train.gradient_accumulation_steps=2",
        ],
    );
    assert!(
        e.contains("train.steps_per_generation") && e.contains("multiple"),
        "{e}"
    );
    let text = format!("model_name_or_path: Qwen/Qwen2.5-0.5B\n{BASE}");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("model.path"), "{e}");

    // Nothing close: the valid keys are listed.
    let text = format!("{BASE}  zzzz: 1\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("valid keys of train:") && e.contains("learning_rate"),
        "{e}"
    );
}

#[test]
fn wrong_type_names_the_key_the_expected_type_and_the_value() {
    let text = BASE.replace("learning_rate: 1.0e-3", "learning_rate: fast");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("wrong type for train.learning_rate in demo.yaml"),
        "{e}"
    );
    assert!(e.contains("expected a number, got \"fast\""), "{e}");
    assert!(e.contains("\"fast\""), "{e}");

    let text = format!("{BASE}  lr_scheduler_type: cosin\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("train.lr_scheduler_type"), "{e}");
    assert!(e.contains("cosine"), "{e}");

    let text = format!("{BASE}rollout:\n  num_generations: 8.5\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("rollout.num_generations") && e.contains("8.5"),
        "{e}"
    );

    let text = BASE.replace("[train.jsonl]", "[{path: a.jsonl, weight: heavy}]");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("data.train_files[0].weight"), "{e}");

    // A section that is not a mapping.
    let text = format!("{BASE}eval: 3\n");
    let e = err(&text, NO_OVERRIDES);
    assert!(e.contains("wrong type for eval"), "{e}");
}

#[test]
fn overrides_set_nested_keys_and_parse_yaml_scalars() {
    let r = Recipe::from_yaml_str(
        BASE,
        "demo.yaml",
        &[
            "train.learning_rate=3e-4",
            "train.loss_type=dr_grpo",
            "train.lr_scheduler_type=cosine",
            "rollout.endpoints=[http://a:8000, http://b:8000]",
            "rollout.client_tag_echo=ignore",
            "rollout.top_k=50",
            "data.train_files[0].weight=2",
            "data.train_files[1]=other.parquet",
            "data.prompt_template=Q: {question} A:",
            "data.on_long_prompt=truncate",
            "eval.max_examples=null",
            "model.init_seed=7",
        ],
    )
    .unwrap();
    assert_eq!(r.train.learning_rate, 3e-4);
    assert_eq!(r.train.loss.loss_type, LossType::DrGrpo);
    assert_eq!(r.train.lr_scheduler_type, LrSchedulerType::Cosine);
    assert_eq!(r.rollout.endpoints, ["http://a:8000", "http://b:8000"]);
    assert_eq!(r.rollout.client_tag_echo, ClientTagEcho::Ignore);
    assert_eq!(r.rollout.top_k, Some(50));
    assert_eq!(r.data.train_files[0].weight, 2.0);
    assert_eq!(r.data.train_files[1], DataFile::new("other.parquet"));
    assert_eq!(r.data.prompt_template, "Q: {question} A:");
    assert_eq!(r.data.on_long_prompt, OnLongPrompt::Truncate);
    assert_eq!(r.model.init_seed, 7);

    // `1e-3` is a number in YAML 1.2 (PyYAML would read a string).
    let r = Recipe::from_yaml_str(&BASE.replace("1.0e-3", "1e-3"), "x", NO_OVERRIDES).unwrap();
    assert_eq!(r.train.learning_rate, 1e-3);

    // An override creates a section the file does not have.
    let r = Recipe::from_yaml_str(BASE, "x", &["checkpoint.save_steps=5"]).unwrap();
    assert_eq!(r.checkpoint.save_steps, StepInterval::Steps(5));
}

#[test]
fn override_of_an_unknown_key_or_with_a_wrong_type_is_an_error() {
    let e = err(BASE, &["train.learning_rat=1e-3"]);
    assert!(e.contains("unknown key train.learning_rat"), "{e}");
    assert!(e.contains("override train.learning_rat=1e-3"), "{e}");
    assert!(e.contains("did you mean train.learning_rate?"), "{e}");

    let e = err(BASE, &["train.max_steps=many"]);
    assert!(e.contains("wrong type for train.max_steps"), "{e}");
    assert!(e.contains("override train.max_steps=many"), "{e}");

    let e = err(BASE, &["train.learning_rate"]);
    assert!(e.contains("bad override"), "{e}");
    let e = err(BASE, &["train.learning_rate.x=1"]);
    assert!(e.contains("has no sub-keys"), "{e}");
    let e = err(BASE, &["data.train_files=[{pth: a.jsonl}]"]);
    assert!(
        e.contains("data.train_files[0].pth in override data.train_files="),
        "{e}"
    );
    let e = err(BASE, &["data.train_files[5].weight=1"]);
    assert!(e.contains("gap"), "{e}");
}

#[test]
fn other_versions_are_refused() {
    let text = BASE.replace("version: 1", "version: 2");
    let e = err(&text, NO_OVERRIDES);
    assert!(
        e.contains("version 2") && e.contains("reads version 1"),
        "{e}"
    );
    // Before the unknown keys a newer format would have.
    let text = format!("{text}new_section: {{}}\n");
    assert!(matches!(
        Recipe::from_yaml_str(&text, "x", NO_OVERRIDES),
        Err(RecipeError::Version { .. })
    ));
    let e = err(BASE, &["version=3"]);
    assert!(e.contains("override version=3"), "{e}");
    // No version: the current one.
    let text = BASE.replace("version: 1\n", "");
    assert_eq!(
        Recipe::from_yaml_str(&text, "x", NO_OVERRIDES)
            .unwrap()
            .version,
        1
    );
}

/// `rollout.tools`: each entry's fields are checked by key, and the keys
/// that go with tools act only with them.
#[test]
fn tools_are_checked_by_key() {
    let add = "rollout.tools=[{name: add, description: Adds., url: \"http://127.0.0.1:9/add\", \
               parameters: {type: object, properties: {a: {type: number}}}}]";
    let r = Recipe::from_yaml_str(BASE, "x", &[add.to_string()]).unwrap();
    assert_eq!(r.rollout.tools[0].name, "add");
    assert_eq!(
        r.rollout.tools[0].parameters["properties"]["a"]["type"],
        "number"
    );
    assert_eq!(r.rollout.tool_call_parser, "hermes");
    for (bad, key, says) in [
        (
            "rollout.tools[0].name=a b",
            "rollout.tools[0].name",
            "not a function name",
        ),
        (
            "rollout.tools[0].url=/add",
            "rollout.tools[0].url",
            "http(s) URL",
        ),
        (
            "rollout.tools[0].parameters={type: array}",
            "rollout.tools[0].parameters",
            "object",
        ),
        (
            "rollout.tool_call_parser=mistral",
            "rollout.tool_call_parser",
            "hermes, llama3_json",
        ),
        (
            "rollout.max_tool_calling_iterations=0",
            "rollout.max_tool_calling_iterations",
            ">= 1",
        ),
        ("rollout.tool_timeout_s=0", "rollout.tool_timeout_s", "> 0"),
        (
            "rollout.python_tool_processes=0",
            "rollout.python_tool_processes",
            ">= 1",
        ),
        (
            "data.prompt_template={question}=",
            "data.prompt_template",
            "chat",
        ),
    ] {
        let e = err(BASE, &[add, bad]);
        assert!(e.contains(key) && e.contains(says), "{bad}: {e}");
    }
    let e = err(BASE, &[add, "rollout.tools[0].argh=1"]);
    assert!(e.contains("rollout.tools[0].argh"), "{e}");
    let twice = add.replace("}]", "}, {name: add, url: \"http://127.0.0.1:9/x\"}]");
    let e = err(BASE, &[&twice]);
    assert!(
        e.contains("rollout.tools[1].name") && e.contains("two tools"),
        "{e}"
    );
    let e = err(BASE, &["rollout.max_tool_calling_iterations=2"]);
    assert!(
        e.contains("rollout.max_tool_calling_iterations") && e.contains("rollout.tools"),
        "{e}"
    );
    // A Python function's definition is its own: no name or schema beside
    // it, and a spec that names a function.
    let python = "rollout.tools=[{python: \"tools/my_tools.py:add\"}]";
    let r = Recipe::from_yaml_str(BASE, "x", &[python.to_string()]).unwrap();
    assert_eq!(
        r.rollout.tools[0].python.as_deref(),
        Some("tools/my_tools.py:add")
    );
    for (bad, key, says) in [
        (
            "rollout.tools[0].name=add",
            "rollout.tools[0].name",
            "docstring",
        ),
        (
            "rollout.tools[0].parameters={type: object, properties: {a: {type: number}}}",
            "rollout.tools[0].parameters",
            "type hints",
        ),
        (
            "rollout.tools[0].python=my_tools.py",
            "rollout.tools[0].python",
            "path/to/file.py:FUNCTION",
        ),
        (
            "rollout.tools[0].python=my_tools.py:2x",
            "rollout.tools[0].python",
            "package.module:FUNCTION",
        ),
    ] {
        let e = err(BASE, &[python, bad]);
        assert!(e.contains(key) && e.contains(says), "{bad}: {e}");
    }
    // TRL's environment_factory: tools of its own (max_tool_calling_iterations
    // acts with it), rows reset with their columns; its instances live in
    // the one process the reward functions read them in, and only until
    // their completions are scored (no step generated ahead).
    let env = "rollout.environment_factory=\"my_env.py:Counter\"";
    let r =
        Recipe::from_yaml_str(BASE, "x", &[env, "rollout.max_tool_calling_iterations=2"]).unwrap();
    assert_eq!(
        r.rollout.environment_factory,
        Some(EnvironmentFactory::One("my_env.py:Counter".into()))
    );
    // TRL's dict: each row names its environment (column `environment`).
    let named =
        "rollout.environment_factory={count: \"my_env.py:Counter\", guess: \"games:Wordle\"}";
    let factory = Recipe::from_yaml_str(BASE, "x", &[named])
        .unwrap()
        .rollout
        .environment_factory
        .unwrap();
    assert_eq!(
        factory.entries(),
        [
            (Some("count"), "my_env.py:Counter"),
            (Some("guess"), "games:Wordle")
        ]
    );
    assert!(learner::data::ColumnMapping::from_recipe(&r).keep_columns);
    // An environment may own the reward (TRL's get_reward()): whether its
    // class has one is read when the learner starts, so no reward function
    // is needed here; without an environment, one is.
    Recipe::from_yaml_str(BASE, "x", &[env, "reward.functions=[]"]).unwrap();
    // A step generated ahead is scored at once, its environments then given
    // back: a checkpoint holds its rewards.
    Recipe::from_yaml_str(BASE, "x", &[env, "rollout.async_lag=1"]).unwrap();
    // ... and write the prompts (TRL's environment-owned data): no files,
    // but not with epochs to count over them, nor with a map of
    // environments, which rows choose among.
    Recipe::from_yaml_str(BASE, "x", &[env, "data.train_files=[]"]).unwrap();
    let e = err(
        BASE,
        &[
            env,
            "data.train_files=[]",
            "train.max_steps=-1",
            "train.num_train_epochs=2",
        ],
    );
    assert!(
        e.contains("train.num_train_epochs") && e.contains("set train.max_steps"),
        "{e}"
    );
    let e = err(
        BASE,
        &[
            "rollout.environment_factory={a: \"env.py:A\"}",
            "data.train_files=[]",
        ],
    );
    assert!(
        e.contains("data.train_files") && e.contains("each row names its environment"),
        "{e}"
    );
    let e = err(BASE, &["data.train_files=[]"]);
    assert!(
        e.contains("data.train_files") && e.contains("no training data"),
        "{e}"
    );
    let e = err(BASE, &["reward.functions=[]"]);
    assert!(
        e.contains("reward.functions") && e.contains("no reward function"),
        "{e}"
    );
    for (bad, key, says) in [
        (
            "rollout.environment_factory=my_env.py",
            "rollout.environment_factory",
            "path/to/file.py:FUNCTION",
        ),
        (
            "rollout.environment_factory={count: my_env.py, guess: \"games:Wordle\"}",
            "rollout.environment_factory.count",
            "path/to/file.py:FUNCTION",
        ),
        (
            "rollout.environment_factory={}",
            "rollout.environment_factory",
            "names no environment",
        ),
        (
            "rollout.environment_factory=[my_env.py:Counter]",
            "rollout.environment_factory",
            "a map of environment names",
        ),
        (
            "rollout.python_tool_processes=2",
            "rollout.environment_factory",
            "python_tool_processes: 1",
        ),
        (
            "data.prompt_template={question}=",
            "data.prompt_template",
            "environment_factory need chat prompts",
        ),
    ] {
        let e = err(BASE, &[env, bad]);
        assert!(e.contains(key) && e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn validation_names_the_key() {
    let e = err(BASE, &["train.per_device_train_batch_size=12"]);
    assert!(
        e.contains("train.per_device_train_batch_size") && e.contains("num_generations"),
        "{e}"
    );
    let e = err(BASE, &["rollout.async_lag=2"]);
    assert!(e.contains("rollout.async_lag"), "{e}");
    let e = err(BASE, &["train.epsilon=-0.1"]);
    assert!(e.contains("train.epsilon"), "{e}");
    let e = err(BASE, &["model.path=/models/x"]);
    assert!(e.contains("both set"), "{e}");
    let e = err(BASE, &["eval.eval_steps=10"]);
    assert!(e.contains("eval_files"), "{e}");
    let e = err(BASE, &["data.train_files[0].expected_hash=abc"]);
    assert!(e.contains("expected_hash"), "{e}");
    let e = err(BASE, &["reward.functions=[]"]);
    assert!(e.contains("reward.functions"), "{e}");
    let e = err(BASE, &["model.device=gpu"]);
    assert!(e.contains("model.device"), "{e}");
    // The warm-up's early stop needs a window's worth of steps.
    let e = err(
        BASE,
        &["train.sft_warmup_steps=20", "train.sft_target_loss=0.5"],
    );
    assert!(
        e.contains("train.sft_target_loss") && e.contains("at least 50"),
        "{e}"
    );
    let e = err(
        BASE,
        &["train.sft_warmup_steps=100", "train.sft_target_loss=0"],
    );
    assert!(
        e.contains("train.sft_target_loss") && e.contains("> 0"),
        "{e}"
    );
    let e = err(BASE, &["model.use_dora=true"]);
    assert!(
        e.contains("model.use_dora") && e.contains("use_peft"),
        "{e}"
    );
    let e = err(BASE, &["train.sft_lr_scheduler_type=cosine_with_min_lr"]);
    assert!(e.contains("train.sft_lr_scheduler_type"), "{e}");
    let e = err(BASE, &["train.sync_ref_model=true"]);
    assert!(
        e.contains("train.sync_ref_model") && e.contains("beta"),
        "{e}"
    );
    let e = err(BASE, &["train.ref_model_mixup_alpha=1.5"]);
    assert!(e.contains("train.ref_model_mixup_alpha"), "{e}");
    let e = err(BASE, &["train.ref_model_sync_steps=0"]);
    assert!(e.contains("train.ref_model_sync_steps"), "{e}");
    let e = err(BASE, &["train.top_entropy_quantile=0"]);
    assert!(e.contains("top_entropy_quantile"), "{e}");
    let e = err(BASE, &["rollout.generation_kwargs.temperature=0.5"]);
    assert!(
        e.contains("rollout.generation_kwargs.temperature") && e.contains("rollout.temperature"),
        "{e}"
    );
    let e = err(BASE, &["rollout.generation_kwargs.n=2"]);
    assert!(e.contains("rollout.num_generations"), "{e}");
    let e = err(
        BASE,
        &[
            "data.filter_overlong_prompts=true",
            "rollout.max_prompt_length=null",
        ],
    );
    assert!(
        e.contains("data.filter_overlong_prompts") && e.contains("rollout.max_prompt_length"),
        "{e}"
    );
    let e = err(BASE, &["train.max_tokens_per_micro_batch=0"]);
    assert!(e.contains("train.max_tokens_per_micro_batch"), "{e}");
    // Dynamic sampling's settings act only with it on, and must make sense.
    for key in [
        "train.dynamic_sampling_metric=format",
        "train.dynamic_sampling_reward_range=[0, 1]",
        "train.dynamic_sampling_batch_prompts=12",
    ] {
        let e = err(BASE, &[key]);
        let name = key.split('=').next().unwrap();
        assert!(
            e.contains(name) && e.contains("train.dynamic_sampling: true"),
            "{e}"
        );
    }
    let on = "train.dynamic_sampling=true";
    let e = err(BASE, &[on, "train.dynamic_sampling_reward_range=[1, 0]"]);
    assert!(
        e.contains("train.dynamic_sampling_reward_range") && e.contains("low < high"),
        "{e}"
    );
    let e = err(BASE, &[on, "train.dynamic_sampling_batch_prompts=0"]);
    assert!(e.contains("train.dynamic_sampling_batch_prompts"), "{e}");
    let e = err(BASE, &[on, "train.dynamic_sampling_metric=' '"]);
    assert!(e.contains("train.dynamic_sampling_metric"), "{e}");
}

/// generation_kwargs is open: any vLLM sampling parameter, from YAML or an
/// override, goes through as it is.
#[test]
fn generation_kwargs_take_any_other_sampling_parameter() {
    let yaml = format!(
        "{BASE}rollout:\n  generation_kwargs:\n    stop: [\"</answer>\"]\n    include_stop_str_in_output: true\n"
    );
    let r = Recipe::from_yaml_str(
        &yaml,
        "r.yaml",
        &["rollout.generation_kwargs.presence_penalty=0.5"],
    )
    .unwrap();
    let kw = &r.rollout.generation_kwargs;
    assert_eq!(kw["stop"], serde_json::json!(["</answer>"]));
    assert_eq!(kw["include_stop_str_in_output"], true);
    assert_eq!(kw["presence_penalty"], 0.5);
}

#[test]
fn yaml_errors_name_the_file() {
    let e = err("train: [unclosed\n", NO_OVERRIDES);
    assert!(e.contains("demo.yaml is not valid YAML"), "{e}");
    let e = err("- a\n- b\n", NO_OVERRIDES);
    assert!(e.contains("mapping of sections"), "{e}");
}

#[test]
fn the_shipped_recipes_load_and_validate() {
    let demo = Recipe::demo(NO_OVERRIDES).unwrap();
    assert_eq!(demo.model.preset, Some(ModelPreset::Tiny));
    assert_eq!(demo.rollout.num_generations, 8);
    assert_eq!(demo.topology.learner_ranks, 2);
    assert!(!demo.eval.eval_steps.is_never() && !demo.data.eval_files.is_empty());
    assert_eq!(demo.prompts_per_rank_per_step(), 8);
    // The embedded text is the file.
    let from_file = Recipe::load(&configs().join("demo.yaml"), NO_OVERRIDES).unwrap();
    assert_eq!(from_file, demo);
    // Its data files exist relative to the repository root.
    for f in demo.data.train_files.iter().chain(&demo.data.eval_files) {
        let p = configs().join("..").join(&f.path);
        assert!(p.is_file(), "{} is missing", p.display());
    }

    // The open-r1 style recipe: TRL's knobs under Tandem's keys.
    let r1 = Recipe::load(&configs().join("open_r1_math.yaml"), NO_OVERRIDES).unwrap();
    assert_eq!(r1.rollout.num_generations, 16);
    assert!(r1.train.mask_truncated_completions && r1.log.log_completions);
    assert_eq!(
        (r1.train.max_steps, r1.train.num_train_epochs),
        (0, Some(1.0))
    );
    let names: Vec<&str> = r1
        .reward
        .functions
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["exact_match", "format", "tag_count"]);
    // Its reward functions build (the format regex compiles).
    let functions: Vec<serde_json::Value> = r1
        .reward
        .functions
        .iter()
        .map(|f| serde_json::to_value(f).unwrap())
        .collect();
    learner::rewards::RewardRegistry::from_configs(&functions).unwrap();

    // verl's DAPO test recipe: dynamic sampling in rounds of 96 prompts over
    // its 2 learner ranks, the metric a reward it has.
    let dapo = Recipe::load(&configs().join("dapo_gsm8k.yaml"), NO_OVERRIDES).unwrap();
    let dapo = dapo.for_world_size(dapo.topology.learner_ranks).unwrap();
    assert!(dapo.train.dynamic_sampling);
    assert_eq!(dapo.train.dynamic_sampling_batch_prompts, Some(96));
    assert_eq!(dapo.prompts_per_rank_per_step() * 2, 32);
    let rewards = learner::rewards::RewardRegistry::from_section(&dapo.reward).unwrap();
    let labels: Vec<String> = rewards.labels().iter().map(|s| s.to_string()).collect();
    assert!(
        learner::dynamic_sampling::GroupFilter::from_recipe(&dapo.train, &labels)
            .unwrap()
            .is_some()
    );

    // A TRL script's Python pieces as they are: the tool's definition read
    // from its docstring, listed by the recipe's template; the reward
    // functions import. (Their paths are from the repository root.)
    let root = configs().join("..");
    let from_root = |spec: &str| root.join(spec).display().to_string();
    let template_file = format!(
        "data.chat_template={}",
        from_root("configs/trl_callables.jinja")
    );
    let mut trl = Recipe::load(&configs().join("trl_callables.yaml"), &[template_file]).unwrap();
    assert!(trl.reward.takes_row_columns());
    for t in &mut trl.rollout.tools {
        t.python = t.python.as_deref().map(from_root);
    }
    trl.rollout.environment_factory = match trl.rollout.environment_factory {
        Some(EnvironmentFactory::One(spec)) => Some(EnvironmentFactory::One(from_root(&spec))),
        other => other,
    };
    for f in &mut trl.reward.functions {
        let spec = f.params["function"].as_str().unwrap().to_string();
        f.params.insert("function".into(), from_root(&spec).into());
    }
    let mut tools = learner::tools::ToolRunner::from_recipe(&trl)
        .unwrap()
        .unwrap();
    // The tool, then the environment's method, as TRL lists them.
    assert_eq!(
        tools.definitions()[0]["function"]["parameters"]["required"],
        serde_json::json!(["expression"])
    );
    assert_eq!(tools.definitions()[1]["function"]["name"], "submit");
    let template =
        model::tokenizer::chat_template_text(trl.data.chat_template.as_ref().unwrap()).unwrap();
    let tok = model::presets::tokenizer()
        .unwrap()
        .with_chat_template(&template)
        .unwrap();
    assert_eq!(tools.unlisted_tools_warning(&tok).unwrap(), None);
    let mut rewards = learner::rewards::RewardRegistry::from_section(&trl.reward).unwrap();
    tools.attach_rewards(&mut rewards).unwrap();
    rewards.prepare().unwrap();
    assert_eq!(
        rewards.labels(),
        ["accuracy_reward", "tool_use_reward", "AnswerChecker"]
    );

    let ext = Recipe::load(&configs().join("external_vllm.yaml"), NO_OVERRIDES).unwrap();
    assert_eq!(ext.rollout.client_tag_echo, ClientTagEcho::Ignore);
    assert_eq!(ext.reward.functions.len(), 2);
    assert_eq!(
        ext.reward.functions[1].params["pattern"],
        serde_json::json!("^.*</think> <answer>.*</answer>$")
    );
}

#[test]
fn resolved_output_round_trips_with_every_default() {
    let r = Recipe::from_yaml_str(
        BASE,
        "x",
        &["rollout.api_key=secret", "train.epsilon_high=0.28"],
    )
    .unwrap();
    let yaml = r.resolved_yaml().unwrap();
    for key in [
        "adam_beta2:",
        "max_nonfinite_steps:",
        "vllm_importance_sampling_cap:",
        "rollout_servers:",
    ] {
        assert!(yaml.contains(key), "{key} missing from\n{yaml}");
    }
    let back = Recipe::from_yaml_str(&yaml, "resolved.yaml", NO_OVERRIDES).unwrap();
    assert_eq!(back, r);

    let json = r.to_json();
    assert!(json["train"]["beta"].is_number());
    assert!(json["model"]["path"].is_null());
    let back = Recipe::from_value(json, "resolved.json", NO_OVERRIDES).unwrap();
    assert_eq!(back, r);

    let red = r.to_json_redacted();
    assert_eq!(red["rollout"]["api_key"], "<redacted>");
    assert!(red["rollout"]["weight_sync_token"].is_null());
    assert!(!red.to_string().contains("secret"));
}

#[test]
fn known_keys_cover_every_section() {
    let keys = Recipe::known_keys();
    assert_eq!(learner::recipe::SECTION_NAMES.len(), 9);
    for section in learner::recipe::SECTION_NAMES {
        assert!(
            keys.iter().any(|k| k.starts_with(&format!("{section}."))),
            "{section}"
        );
    }
}

#[test]
fn num_train_epochs_counts_the_run_in_passes_over_the_prompts() {
    let load = |overrides: &[&str]| Recipe::from_yaml_str(BASE, "r.yaml", overrides).unwrap();
    let r = load(&["train.num_train_epochs=2"]);
    assert_eq!(
        r.train.max_steps, 0,
        "epochs without max_steps count in epochs"
    );
    let per_rank = r.prompts_per_rank_per_step() as u64;
    // 2 ranks, 10 whole steps and a partial one per pass: 2 x 10 steps.
    let prompts = per_rank * 2 * 10 + 3;
    assert_eq!(r.total_steps(prompts, 2).unwrap(), 20);
    // Fractional epochs round up, as transformers does.
    let r = load(&["train.num_train_epochs=1.25"]);
    assert_eq!(r.total_steps(per_rank * 10, 1).unwrap(), 13);
    // TRL's max_steps: -1 is "not set" too; a positive max_steps wins.
    let r = load(&["train.num_train_epochs=1", "train.max_steps=-1"]);
    assert_eq!(r.total_steps(per_rank * 7, 1).unwrap(), 7);
    let r = load(&["train.num_train_epochs=1", "train.max_steps=5"]);
    assert_eq!(r.total_steps(per_rank * 7, 1).unwrap(), 5);
    // Without epochs, max_steps counts alone (the default: 1000).
    assert_eq!(load(&[]).total_steps(1, 1).unwrap(), 1000);

    // Fewer prompts than a step takes: an error that says what to change.
    let r = load(&["train.num_train_epochs=1"]);
    let e = r.total_steps(per_rank * 2 - 1, 2).unwrap_err().to_string();
    assert!(
        e.contains("train.num_train_epochs") && e.contains(&format!("{}", per_rank * 2 - 1)),
        "{e}"
    );
    // Neither set, or nonsense epochs: errors naming the key.
    let e = err(BASE, &["train.max_steps=-1"]);
    assert!(
        e.contains("train.max_steps") && e.contains("num_train_epochs"),
        "{e}"
    );
    let e = err(BASE, &["train.num_train_epochs=0"]);
    assert!(
        e.contains("train.num_train_epochs") && e.contains("> 0"),
        "{e}"
    );
}

/// A recipe brought over from TRL / open-r1 gets every unknown key in one
/// error, each with what to do about it, instead of one per attempt.
#[test]
fn every_unknown_key_is_named_at_once_with_its_hint() {
    let text = BASE.replace(
        "train:\n",
        "train:\n  bf16: true\n  overwrite_output_dir: true\n  lerning_rate: 1.0\n",
    ) + "log:\n  log_level: info\n";
    let e = err(&text, NO_OVERRIDES);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines[0], "4 unknown keys in demo.yaml:", "{e}");
    assert!(
        lines[1].starts_with("  train.bf16: the dtype is model.dtype"),
        "{e}"
    );
    assert!(
        lines[2].starts_with("  train.overwrite_output_dir: a run folder"),
        "{e}"
    );
    assert_eq!(
        lines[3],
        "  train.lerning_rate: did you mean train.learning_rate?"
    );
    assert!(
        lines[4].starts_with("  log.log_level: the RUST_LOG environment variable"),
        "{e}"
    );
    assert_eq!(lines.len(), 5, "{e}");

    // A flat TRL recipe is told about the converter.
    let e = err("learning_rate: 1.0e-6\nnum_generations: 8\n", NO_OVERRIDES);
    assert!(
        e.contains("did you mean train.learning_rate?")
            && e.ends_with("`learner convert-recipe demo.yaml` rewrites it in Tandem's sections."),
        "{e}"
    );
    assert!(!err(&text, NO_OVERRIDES).contains("convert-recipe"));
    // So is a verl configuration.
    let e = err(
        "actor_rollout_ref:\n  model:\n    path: /m\nalgorithm:\n  adv_estimator: grpo\n",
        NO_OVERRIDES,
    );
    assert!(
        e.ends_with("rewrites it as a Tandem recipe (a launch script's overrides too)."),
        "{e}"
    );

    // verl's names get theirs, not a misleading nearest key.
    let e = err(BASE, &["train.kl_loss_type=low_var_kl"]);
    assert!(
        e.contains("train.kl_estimator") && e.contains("low_var_kl is k3"),
        "{e}"
    );
    let e = err(BASE, &["train.loss_agg_mode=token-mean"]);
    assert!(e.contains("token-mean corresponds to dapo"), "{e}");
}

/// transformers' save_strategy / eval_strategy: `no`, `steps`, `epoch`.
#[test]
fn save_and_eval_strategies_take_transformers_values() {
    use learner::recipe::IntervalStrategy::{Epoch, No, Steps};
    let load = |overrides: &[&str]| Recipe::from_yaml_str(BASE, "r.yaml", overrides);
    let r = load(&[]).unwrap();
    assert_eq!(
        (r.checkpoint.save_strategy, r.eval.eval_strategy),
        (Steps, Steps)
    );
    let text = format!("{BASE}checkpoint:\n  save_strategy: \"no\"\n");
    let r = Recipe::from_yaml_str(&text, "r.yaml", NO_OVERRIDES).unwrap();
    assert_eq!(r.checkpoint.save_strategy, No);
    // Unquoted, as YAML 1.1 reads it (false), too.
    let text = format!("{BASE}checkpoint:\n  save_strategy: no\n");
    let r = Recipe::from_yaml_str(&text, "r.yaml", NO_OVERRIDES).unwrap();
    assert_eq!(r.checkpoint.save_strategy, No);
    let r = load(&["checkpoint.save_strategy=epoch"]).unwrap();
    assert_eq!(r.checkpoint.save_strategy, Epoch);
    let e = err(BASE, &["checkpoint.save_strategy=best"]);
    assert!(
        e.contains("checkpoint.save_strategy") && e.contains("`no`, `steps`, `epoch`"),
        "{e}"
    );
    // Epoch evals need held-out files, as step evals do.
    let e = err(BASE, &["eval.eval_strategy=epoch"]);
    assert!(
        e.contains("eval.eval_strategy") && e.contains("eval_files"),
        "{e}"
    );
    let with_eval = |o: &[&str]| {
        let mut all = vec!["data.eval_files=[e.jsonl]"];
        all.extend_from_slice(o);
        load(&all).unwrap().eval.enabled()
    };
    assert!(!with_eval(&[]), "eval_steps 0: no eval");
    assert!(with_eval(&["eval.eval_steps=5"]));
    assert!(!with_eval(&["eval.eval_steps=5", "eval.eval_strategy=no"]));
    assert!(with_eval(&["eval.eval_strategy=epoch"]));

    // The schedule: multiples of the interval, or of the steps in a pass.
    let due = |s: learner::recipe::IntervalStrategy, every, per_epoch| -> Vec<u64> {
        (1..=8)
            .filter(|&step| s.due(step, every, per_epoch))
            .collect()
    };
    assert_eq!(due(Steps, 3, None), [3, 6]);
    assert_eq!(due(Steps, 0, Some(2)), Vec::<u64>::new());
    assert_eq!(due(Epoch, 3, Some(4)), [4, 8]);
    assert_eq!(due(No, 1, Some(1)), Vec::<u64>::new());
    // Steps in a pass, named after the setting that asked.
    let r = load(&[]).unwrap();
    let per_rank = r.prompts_per_rank_per_step() as u64;
    assert_eq!(r.steps_per_epoch(per_rank * 5 + 1, 1, "x").unwrap(), 5);
    let e = r
        .steps_per_epoch(per_rank - 1, 1, "checkpoint.save_strategy")
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoint.save_strategy"), "{e}");
}

/// open-r1's `lr_scheduler_type: cosine_with_min_lr` with
/// `lr_scheduler_kwargs: {min_lr_rate: 0.1}`, checked as transformers does.
#[test]
fn cosine_with_min_lr_takes_its_kwargs_as_transformers_does() {
    let load = |overrides: &[&str]| Recipe::from_yaml_str(BASE, "r.yaml", overrides);
    let r = load(&[
        "train.lr_scheduler_type=cosine_with_min_lr",
        "train.lr_scheduler_kwargs={min_lr_rate: 0.1}",
    ])
    .unwrap();
    assert_eq!(r.train.lr_scheduler_type, LrSchedulerType::CosineWithMinLr);
    assert_eq!(r.train.min_lr_rate(), 0.1);
    // min_lr is a rate of learning_rate (BASE: 1e-3).
    let r = load(&[
        "train.lr_scheduler_type=cosine_with_min_lr",
        "train.lr_scheduler_kwargs.min_lr=2.5e-4",
    ])
    .unwrap();
    assert!((r.train.min_lr_rate() - 0.25).abs() < 1e-12);
    assert_eq!(load(&[]).unwrap().train.min_lr_rate(), 0.0);
    let r = load(&["train.lr_scheduler_type=constant_with_warmup"]).unwrap();
    assert_eq!(
        r.train.lr_scheduler_type,
        LrSchedulerType::ConstantWithWarmup
    );

    for (overrides, key, says) in [
        (
            &["train.lr_scheduler_type=cosine_with_min_lr"][..],
            "train.lr_scheduler_kwargs",
            "needs min_lr_rate",
        ),
        (
            &[
                "train.lr_scheduler_type=cosine_with_min_lr",
                "train.lr_scheduler_kwargs={min_lr_rate: 0.1, min_lr: 1.0e-4}",
            ][..],
            "train.lr_scheduler_kwargs",
            "not both",
        ),
        (
            &[
                "train.lr_scheduler_type=cosine_with_min_lr",
                "train.lr_scheduler_kwargs.min_lr_rate=1.5",
            ][..],
            "train.lr_scheduler_kwargs.min_lr_rate",
            "[0, 1]",
        ),
        (
            &[
                "train.lr_scheduler_type=cosine_with_min_lr",
                "train.lr_scheduler_kwargs={min_lr_rate: 0.1, num_cycles: 2}",
            ][..],
            "train.lr_scheduler_kwargs.num_cycles",
            "min_lr_rate or min_lr only",
        ),
        (
            &["train.lr_scheduler_kwargs.min_lr_rate=0.1"][..],
            "train.lr_scheduler_kwargs.min_lr_rate",
            "linear takes no kwargs",
        ),
    ] {
        let e = err(BASE, overrides);
        assert!(e.contains(key) && e.contains(says), "{overrides:?}: {e}");
    }
}

/// transformers' `*_steps` below 1: a fraction of the run's steps, rounded
/// up once the run's length is known.
#[test]
fn step_intervals_take_whole_steps_or_a_fraction_of_the_run() {
    let load = |o: &[&str]| Recipe::from_yaml_str(BASE, "r.yaml", o);
    let r = load(&["checkpoint.save_steps=0.25", "log.logging_steps=10.0"]).unwrap();
    assert_eq!(r.checkpoint.save_steps, StepInterval::Fraction(0.25));
    assert_eq!(r.checkpoint.save_steps.steps(10), 3);
    assert_eq!(r.log.logging_steps, StepInterval::Steps(10));
    assert_eq!(r.log.logging_steps.steps(1000), 10);
    // Written back as given.
    let again =
        Recipe::from_yaml_str(&r.resolved_yaml().unwrap(), "again", &[] as &[&str]).unwrap();
    assert_eq!(again, r);
    for (o, key) in [
        ("checkpoint.save_steps=1.5", "checkpoint.save_steps"),
        ("eval.eval_steps=-0.5", "eval.eval_steps"),
        ("log.logging_steps=0", "log.logging_steps"),
        ("log.logging_steps=often", "log.logging_steps"),
    ] {
        let e = err(BASE, &[o]);
        assert!(e.contains(key), "{o}: {e}");
    }
}

/// TRL's generation_batch_size: steps_per_generation once the learner ranks
/// are known; not together with steps_per_generation.
#[test]
fn generation_batch_size_becomes_steps_per_generation_for_the_ranks() {
    // BASE: 16 completions a micro-batch, num_generations 8 (the default).
    let load = |o: &[&str]| Recipe::from_yaml_str(BASE, "r.yaml", o);
    let r = load(&["train.generation_batch_size=64"]).unwrap();
    assert_eq!(r.train.steps_per_generation, None);
    assert_eq!(
        r.for_world_size(2).unwrap().train.steps_per_generation,
        Some(2)
    );
    assert_eq!(
        r.for_world_size(1).unwrap().train.steps_per_generation,
        Some(4)
    );
    // 64 over 3 ranks of 16, or over updates of 2 x 16 x 4: no.
    let e = r.for_world_size(3).unwrap_err().to_string();
    assert!(
        e.contains("train.generation_batch_size") && e.contains("multiple of 48"),
        "{e}"
    );
    let r = load(&[
        "train.generation_batch_size=64",
        "train.gradient_accumulation_steps=4",
    ])
    .unwrap();
    assert!(r.for_world_size(2).is_err());
    assert_eq!(
        r.for_world_size(1).unwrap().train.updates_per_generation(),
        1
    );
    // Without it, nothing changes.
    let plain = load(&[]).unwrap();
    assert_eq!(plain.for_world_size(4).unwrap(), plain);

    let e = err(
        BASE,
        &[
            "train.generation_batch_size=64",
            "train.steps_per_generation=2",
        ],
    );
    assert!(e.contains("cannot both be set"), "{e}");
    let e = err(BASE, &["train.generation_batch_size=20"]);
    assert!(e.contains("multiple of rollout.num_generations"), "{e}");
}

/// GDPO normalizes each reward function on its own: a blocklist gate, which
/// multiplies the total, cannot join it; a penalty-mode blocklist can.
#[test]
fn gdpo_refuses_a_gate() {
    let gate = [
        "train.multi_objective_aggregation=normalize_then_sum",
        "reward.functions=[{name: exact_match}, {name: blocklist, substrings: [x]}]",
    ];
    let e = err(BASE, &gate);
    assert!(
        e.contains("train.multi_objective_aggregation") && e.contains("mode: penalty"),
        "{e}"
    );
    Recipe::from_yaml_str(
        BASE,
        "demo.yaml",
        &[
            "train.multi_objective_aggregation=normalize_then_sum",
            "reward.functions=[{name: exact_match}, {name: blocklist, substrings: [x], mode: penalty}]",
        ],
    )
    .unwrap();
}

/// A generation_kwargs entry that Tandem's rollout server refuses (a
/// grammar...) is refused up front when the launcher's servers generate,
/// and passed on to an external vLLM; guided decoding by a regex passes.
#[test]
fn generation_kwargs_tandem_servers_refuse_are_refused_up_front() {
    let e = err(
        BASE,
        &["rollout.generation_kwargs={guided_grammar: \"root ::= x\"}"],
    );
    assert!(
        e.contains("rollout.generation_kwargs.guided_grammar") && e.contains("structured output"),
        "{e}"
    );
    let e = err(
        BASE,
        &["rollout.generation_kwargs={structured_outputs: {grammar: \"root ::= x\"}}"],
    );
    assert!(e.contains("generation_kwargs.structured_outputs"), "{e}");
    Recipe::from_yaml_str(
        BASE,
        "demo.yaml",
        &["rollout.generation_kwargs={structured_outputs: {regex: \"[0-9]+\"}}"],
    )
    .unwrap();
    Recipe::from_yaml_str(
        BASE,
        "demo.yaml",
        &[
            "rollout.generation_kwargs={guided_grammar: \"root ::= x\", response_format: {type: text}}",
            "rollout.endpoints=[\"http://127.0.0.1:8000\"]",
            "rollout.client_tag_echo=ignore",
        ],
    )
    .unwrap();
}

//! What a learner trains: every weight of the policy, or (TRL's `use_peft`)
//! LoRA adapters on a frozen base. The optimizer, the gradient all-reduce
//! and the cross-rank weight checks see only [`PolicyParameters::vars`]; the
//! rollout servers and checkpoints get whole model weights, merged.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use model::lora::{Lora, LoraConfig};
use model::{CausalLM, ModelConfig, Weights};

/// The trainable parameters of the policy and how to turn them into a model.
pub struct PolicyParameters {
    /// What the optimizer updates, by name: Hugging Face weight names, or
    /// adapter names (`model.layers.0.self_attn.q_proj.lora_A.weight`) and
    /// the weights LoRA's `modules_to_save` trains whole (`lm_head.weight`).
    pub vars: Vec<(String, Var)>,
    /// The model's weights as the variables' tensors (full fine-tuning), or
    /// the frozen base (LoRA).
    weights: Weights,
    /// LoRA: the adapters' config and the adapters as the variables' tensors.
    lora: Option<Lora>,
}

impl PolicyParameters {
    /// Every weight trains.
    pub fn full(weights: &Weights) -> anyhow::Result<Self> {
        let (vars, view) = model::decoder::trainable(weights)?;
        Ok(PolicyParameters {
            vars,
            weights: view,
            lora: None,
        })
    }

    /// LoRA `adapters` (of `config`, with copies of the modules it trains
    /// whole) train on the frozen `base`.
    pub fn lora(base: Weights, config: LoraConfig, adapters: &Weights) -> anyhow::Result<Self> {
        let (vars, view) = model::decoder::trainable(adapters)?;
        Ok(PolicyParameters {
            vars,
            weights: base,
            lora: Some(Lora {
                config,
                adapters: view,
            }),
        })
    }

    /// The differentiable policy: its gradients reach [`Self::vars`].
    pub fn policy(&self, cfg: &ModelConfig) -> anyhow::Result<CausalLM> {
        Ok(match &self.lora {
            None => CausalLM::new(cfg, &self.weights)?,
            Some(lora) => CausalLM::with_lora(cfg, &self.weights, lora)?,
        })
    }

    /// The adapters now (LoRA runs).
    pub fn adapter(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The frozen base of a LoRA run: the KL reference, as TRL's PEFT runs
    /// take the model with its adapters disabled.
    pub fn frozen_base(&self) -> Option<&Weights> {
        self.lora.as_ref().map(|_| &self.weights)
    }

    /// The weights a rollout server needs to generate from the policy now.
    /// Full fine-tuning: every weight. LoRA: the adapted weights merged
    /// (`W + s B A`); with `whole`, the unchanged rest of the base too (a
    /// server holding another model's weights needs them).
    pub fn push_weights(
        &self,
        cfg: &ModelConfig,
        whole: bool,
    ) -> anyhow::Result<Vec<(String, Tensor)>> {
        match &self.lora {
            None => Ok(self
                .vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect()),
            Some(lora) => {
                let merged = lora.config.merge(cfg, &self.weights, &lora.adapters)?;
                if !whole {
                    return Ok(merged.into_iter().collect());
                }
                Ok(self.merged_all(merged).into_iter().collect())
            }
        }
    }

    /// Every weight of the policy as a plain model (LoRA merged): what a
    /// checkpoint's model folder holds.
    pub fn model_weights(&self, cfg: &ModelConfig) -> anyhow::Result<Weights> {
        Ok(match &self.lora {
            None => self.weights.clone(),
            Some(lora) => {
                let merged = lora.config.merge(cfg, &self.weights, &lora.adapters)?;
                Weights::new(self.merged_all(merged))
            }
        })
    }

    /// The base's weights with `merged` in place of the adapted ones.
    fn merged_all(&self, mut merged: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
        for (name, t) in self.weights.iter() {
            merged.entry(name.clone()).or_insert_with(|| t.clone());
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::lora::TargetModules;
    use model::{DType, Device};

    fn tiny() -> (ModelConfig, Weights) {
        let cfg = model::presets::config(model::presets::Preset::Tiny, 40, 1, 0).unwrap();
        let w = Weights::random(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
        (cfg, w)
    }

    #[test]
    fn full_fine_tuning_trains_and_pushes_every_weight() {
        let (cfg, w) = tiny();
        let p = PolicyParameters::full(&w).unwrap();
        assert_eq!(p.vars.len(), w.len());
        assert!(p.adapter().is_none() && p.frozen_base().is_none());
        let pushed = p.push_weights(&cfg, false).unwrap();
        assert_eq!(pushed.len(), w.len());
        assert_eq!(p.model_weights(&cfg).unwrap().len(), w.len());
    }

    #[test]
    fn lora_trains_adapters_and_pushes_merged_weights() {
        let (cfg, w) = tiny();
        let config = LoraConfig {
            r: 2,
            alpha: 4.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            dropout: 0.0,
            use_dora: false,
            modules_to_save: Vec::new(),
        };
        let adapters = config.init(&cfg, &w, 5, &Device::Cpu, DType::F32).unwrap();
        let p = PolicyParameters::lora(w.clone(), config, &adapters).unwrap();
        let layers = cfg.num_hidden_layers;
        assert_eq!(p.vars.len(), 4 * layers);
        assert!(p.vars.iter().all(|(n, _)| n.contains(".lora_")));
        // A step moves B off zero: the pushed q/v projections change, nothing else.
        for (name, var) in &p.vars {
            if name.contains("lora_B") {
                var.set(&var.as_tensor().ones_like().unwrap()).unwrap();
            }
        }
        let pushed = p.push_weights(&cfg, false).unwrap();
        assert_eq!(pushed.len(), 2 * layers);
        for (name, t) in &pushed {
            assert!(name.ends_with("q_proj.weight") || name.ends_with("v_proj.weight"));
            let before = w.get(name).unwrap();
            let moved = (t - before).unwrap().abs().unwrap().max_all().unwrap();
            assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "{name}");
        }
        let whole = p.push_weights(&cfg, true).unwrap();
        assert_eq!(whole.len(), w.len());
        let model = p.model_weights(&cfg).unwrap();
        assert_eq!(model.len(), w.len());
        assert_eq!(p.frozen_base().unwrap().len(), w.len());
        // The merged model computes what the adapted policy computes.
        let ids = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1]], &Device::Cpu).unwrap();
        let a = p.policy(&cfg).unwrap().forward(&ids, &mask).unwrap();
        let b = CausalLM::new(&cfg, &model)
            .unwrap()
            .forward(&ids, &mask)
            .unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }
}

"""Training recipes: one small class per objective (`finetune.Finetune`, `dpo.DPO`) over the shared steps of
`base.Recipe` (setup -> train -> save); the config objects and the adapter policy are passed in."""

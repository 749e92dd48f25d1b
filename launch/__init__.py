"""How a run starts: which rank this process is (``environment``), joining the others (``distributed``), and job
scripts for Slurm and PBS: what a job asks for (``jobspec``), the script (``jobscript``) and its submission
(``submit``). ``python -m launch env|submit|status|cancel`` (``cli``); docs/launch.md has the details.

Nothing here imports training code at module level; ``environment`` does not even import torch.
"""

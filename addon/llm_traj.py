"""llm-traj as a mitmproxy script:

    mitmdump -s addon/llm_traj.py --mode reverse:https://api.openai.com \
        --set llm_traj_mode=record --set llm_traj_path=trajectories/

mitmproxy puts this folder on sys.path while it loads the script, so the
`llmtraj` package beside it is found from a plain checkout as well as from an
install.
"""

from llmtraj.mitm.addon import make_addons

addons = make_addons()

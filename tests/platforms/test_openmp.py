import threading

import torch

from pagedformers.platforms.openmp import _openmp_runtimes, stay_off_openmp


def test_a_thread_kept_off_openmp_runs_alone_and_the_others_keep_their_threads():
    assert _openmp_runtimes()  # torch's CPU wheels load libgomp: the fix is live here
    before = torch.get_num_threads()
    x = torch.randn(512, 512)
    seen = []

    def api_thread():
        stay_off_openmp()
        seen.append(torch.get_num_threads())
        seen.append(torch.allclose(x @ x, expected, atol=1e-4))  # its ops still run, on this thread alone

    expected = x @ x
    thread = threading.Thread(target=api_thread)
    thread.start()
    thread.join()
    assert seen == [1, True]
    assert torch.get_num_threads() == before

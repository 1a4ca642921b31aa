//go:build e2e

package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestKillDuringPodStarts kills the daemon (SIGKILL) at a random moment of
// a burst of concurrent pod starts, many times; every third time it kills
// the node's process keeper instead. Each time, once the daemon is back,
// `crictl rmp -f -a` removes everything, and nothing may be left: no
// process, mount, network namespace, cgroup, runc state, record, or stream
// held by the keeper.
func TestKillDuringPodStarts(t *testing.T) {
	rounds := 8
	if v, err := strconv.Atoi(os.Getenv("KUASAR_E2E_CRASH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	d := startDaemon(t, daemonOptions{})
	for round := 0; round < rounds; round++ {
		var wg sync.WaitGroup
		for i := 0; i < 6; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				startPodUnchecked(d, kuasarRunc, fmt.Sprintf("crash-%d-%d", round, i), i)
			}()
		}
		delay := time.Duration(rand.IntN(1200)) * time.Millisecond
		time.Sleep(delay)
		victim := "daemon"
		if round%3 == 2 {
			victim = "keeper"
			d.recordKeeper()
			if d.keeperPid == 0 {
				t.Fatalf("round %d: no keeper to kill", round)
			}
			_ = syscall.Kill(d.keeperPid, syscall.SIGKILL)
			wg.Wait()
			d.keeperPid = 0
		} else {
			d.kill(syscall.SIGKILL)
			wg.Wait()
			d.start()
		}
		if out, err := d.crictl("rmp", "-f", "-a").CombinedOutput(); err != nil {
			t.Fatalf("round %d (killed after %v): crictl rmp -f -a: %v\n%s", round, delay, err, out)
		}
		if out, err := d.crictl("rm", "-f", "-a").CombinedOutput(); err != nil {
			t.Fatalf("round %d (killed after %v): crictl rm -f -a: %v\n%s", round, delay, err, out)
		}
		d.recordKeeper()
		d.checkLeaks()
		if t.Failed() {
			t.Fatalf("round %d: leaks after a kill of the %s %v into the burst", round, victim, delay)
		}
		t.Logf("round %d: %s killed %v into the burst, nothing left", round, victim, delay)
	}
}

// startPodUnchecked runs a pod of handler and a container in it, as a
// kubelet would, ignoring errors (the daemon is killed under it). Some pods
// share their PID namespace (they have an init), some containers have a
// terminal.
func startPodUnchecked(d *Daemon, handler, name string, i int) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg := d.podConfig(name)
	pid := runtimeapi.NamespaceMode_CONTAINER
	if i%3 == 0 {
		pid = runtimeapi.NamespaceMode_POD
	}
	cfg.Linux.SecurityContext.NamespaceOptions.Pid = pid
	r, err := d.RS.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		return
	}
	c := ctrConfig("c", "sleep", "3600")
	c.Linux.SecurityContext.NamespaceOptions.Pid = pid
	c.Tty = i%2 == 1
	cr, err := d.RS.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: r.PodSandboxId, Config: c, SandboxConfig: cfg})
	if err != nil {
		return
	}
	if _, err := d.RS.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.ContainerId}); err != nil {
		return
	}
	_, _ = d.RS.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: cr.ContainerId, Cmd: []string{"true"}, Timeout: 5})
}

// TestHolderDiesWhileDown: the init of a shared-PID pod dies while the
// daemon is down. The daemon starts (again and again), reports the pod
// ended, and removes it with nothing left.
func TestHolderDiesWhileDown(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("holderdies")
	podCfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	pod := d.runPod(t, kuasarRunc, podCfg)
	cfg := ctrConfig("c", "sleep", "3600")
	cfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	c := d.run(t, pod, podCfg, cfg)
	holder := podInitPid(t, c, d)
	d.kill(syscall.SIGKILL)
	if err := syscall.Kill(holder, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		d.start() // fails the test if the daemon does not come up
		if st := d.podState(t, pod); st != runtimeapi.PodSandboxState_SANDBOX_NOTREADY {
			t.Fatalf("start %d: pod whose init died is %v", i, st)
		}
		d.kill(syscall.SIGKILL)
	}
	d.start()
	d.stopRemove(t, c, 2)
	d.removePod(t, pod)
}

// TestKeeperMissingAtRestart: the keeper was killed with the daemon and
// cannot be started when the daemon comes back (its binary is gone).
// Pods stay, their containers keep running and are watched; once the
// keeper can run again, stopping and removing them ends every process.
func TestKeeperMissingAtRestart(t *testing.T) {
	keeperCopy := filepath.Join(t.TempDir(), "kuasar-keeper")
	b, err := os.ReadFile(filepath.Join(binDir, "kuasar-keeper"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keeperCopy, b, 0o755); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, daemonOptions{extraConfig: fmt.Sprintf("\n[plugins.'io.containerd.kuasar.monitor.v1.keeper']\n  keeper_path = %q\n", keeperCopy)})
	podCfg := d.podConfig("nokeeper")
	podCfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	pod := d.runPod(t, kuasarRunc, podCfg)
	cfg := ctrConfig("c", "sleep", "4343")
	cfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	c := d.run(t, pod, podCfg, cfg)
	d.kill(syscall.SIGKILL)
	_ = syscall.Kill(d.keeperPid, syscall.SIGKILL)
	d.keeperPid = 0
	if err := os.Rename(keeperCopy, keeperCopy+".away"); err != nil {
		t.Fatal(err)
	}
	d.start()
	if st := d.podState(t, pod); st != runtimeapi.PodSandboxState_SANDBOX_READY {
		t.Errorf("pod %v with its keeper missing", st)
	}
	if st := d.status(t, c); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Errorf("container %v with its keeper missing", st.State)
	}
	if err := os.Rename(keeperCopy+".away", keeperCopy); err != nil {
		t.Fatal(err)
	}
	d.stopRemove(t, c, 2)
	d.removePod(t, pod)
	d.recordKeeper()
	if pids := processesMentioning("sleep 4343"); len(pids) > 0 {
		t.Errorf("the container still runs after its pod was removed: %v", pids)
	}
}

//go:build e2e

package integration

import (
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestRestart restarts the daemon (SIGTERM, then SIGKILL) with pods of both
// handlers running. Afterwards every pod and container is still there and
// running, logs continue, a container that exited while the daemon was down
// reports its real exit code, a terminal container kept its terminal, and
// stop and remove work. A stock runc pod goes through the same, as the
// reference.
func TestRestart(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			type pod struct {
				handler, id       string
				cfg               *runtimeapi.PodSandboxConfig
				ticker, late, tty string
			}
			var pods []*pod
			for _, h := range []string{kuasarRunc, stockRunc} {
				p := &pod{handler: h, cfg: d.podConfig("restart-" + strings.ReplaceAll(h, "-", ""))}
				p.cfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"e2e.svc.cluster.local"}}
				p.id = d.runPod(t, h, p.cfg)
				p.ticker = d.run(t, p.id, p.cfg, ctrConfig("ticker", "sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"))
				p.late = d.run(t, p.id, p.cfg, ctrConfig("late", "sh", "-c", "echo started; sleep 3; echo leaving; exit 7"))
				tty := ctrConfig("tty", "sh", "-c", "while true; do echo tty-$(tty); sleep 0.2; done")
				tty.Tty = true
				p.tty = d.run(t, p.id, p.cfg, tty)
				d.waitLog(t, p.ticker, "tick-2", 10*time.Second)
				d.waitLog(t, p.late, "started", 10*time.Second)
				d.waitLog(t, p.tty, "tty-/dev/pts", 10*time.Second)
				if _, _, code := d.execSync(t, p.ticker, "sh", "-c", "echo shared > /dev/shm/before-restart"); code != 0 {
					t.Fatalf("%s: writing to /dev/shm", h)
				}
				pods = append(pods, p)
			}
			// An exec session with its stdin held open, running across
			// the restart: its client goes with the daemon.
			session := d.crictl("exec", "-i", pods[0].ticker, "cat")
			sessionIn, err := session.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := session.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				sessionIn.Close()
				session.Process.Kill()
				session.Wait()
			}()
			for deadline := time.Now().Add(10 * time.Second); !hasExecStreams(d.keeperIO()); time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("exec session streams not held by the keeper: %v", d.keeperIO())
				}
			}
			started := time.Now()

			d.kill(sig)
			time.Sleep(4 * time.Second) // "late" exits while the daemon is down
			d.start()

			// The streams of the exec session, whose client is gone, are
			// released; those of the containers are kept.
			if keys := d.keeperIO(); hasExecStreams(keys) {
				t.Errorf("the keeper still holds the streams of an exec session that ended with the daemon: %v", keys)
			}
			// Every pod keeps its metadata: its creation time among them.
			list, err := d.RS.ListPodSandbox(ctx(t), &runtimeapi.ListPodSandboxRequest{})
			if err != nil {
				t.Fatal(err)
			}
			for _, item := range list.Items {
				if created := time.Unix(0, item.CreatedAt); created.Before(started.Add(-5*time.Minute)) || created.After(time.Now()) {
					t.Errorf("pod %s (%s) listed as created at %v after the restart", short(item.Id), item.RuntimeHandler, created)
				}
			}
			for _, p := range pods {
				if st := d.podState(t, p.id); st != runtimeapi.PodSandboxState_SANDBOX_READY {
					t.Fatalf("%s pod %v after restart", p.handler, st)
				}
				checkNewContainerAfterRestart(t, d, p.handler, p.id, p.cfg)
				for _, c := range []string{p.ticker, p.tty} {
					if st := d.status(t, c); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
						t.Fatalf("%s container %s %v after restart", p.handler, short(c), st.State)
					}
				}
				st := d.waitState(t, p.late, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second)
				switch {
				case p.handler == stockRunc:
					// Stock containerd drops the task of a container that
					// exited while it was down ("cleaning leaked shim
					// process") and reports 255; recorded, not required.
					t.Logf("stock runc: container that exited during the restart reports %d", st.ExitCode)
				case st.ExitCode != 7:
					t.Fatalf("%s: container that exited during the restart reports %d, want 7", p.handler, st.ExitCode)
				}
				// Logs continue past the restart, on both kinds of stdio.
				before := countLines(t, d, p.ticker)
				deadline := time.Now().Add(10 * time.Second)
				for countLines(t, d, p.ticker) < before+5 {
					if time.Now().After(deadline) {
						t.Fatalf("%s: ticker log stopped after restart", p.handler)
					}
					time.Sleep(100 * time.Millisecond)
				}
				ttyBefore := countLines(t, d, p.tty)
				for countLines(t, d, p.tty) < ttyBefore+3 {
					if time.Now().After(deadline) {
						t.Fatalf("%s: terminal log stopped after restart", p.handler)
					}
					time.Sleep(100 * time.Millisecond)
				}
				if out, _, code := d.execSync(t, p.ticker, "echo", "alive"); code != 0 || out != "alive\n" {
					t.Fatalf("%s: exec after restart: %q %d", p.handler, out, code)
				}
			}
			// A second restart with nothing changed, then clean removal.
			d.restart(syscall.SIGTERM)
			for _, p := range pods {
				for _, c := range []string{p.ticker, p.late, p.tty} {
					d.stopRemove(t, c, 2)
				}
				d.removePod(t, p.id)
			}
		})
	}
}

// checkNewContainerAfterRestart starts a container in a pod that outlived a
// restart: it must get the pod's hostname, hosts, DNS and shared /dev/shm
// as one started before did.
func checkNewContainerAfterRestart(t *testing.T, d *Daemon, handler, pod string, cfg *runtimeapi.PodSandboxConfig) {
	t.Helper()
	c := d.run(t, pod, cfg, ctrConfig("after-restart", "sleep", "3600"))
	for _, tc := range []struct {
		cmd  []string
		want string
	}{
		{[]string{"cat", "/etc/hostname"}, cfg.Hostname + "\n"},
		{[]string{"grep", "-c", "nameserver 10.96.0.10", "/etc/resolv.conf"}, "1\n"},
		{[]string{"grep", "-c", "search e2e.svc.cluster.local", "/etc/resolv.conf"}, "1\n"},
		{[]string{"sh", "-c", "grep -q localhost /etc/hosts && echo ok"}, "ok\n"},
		{[]string{"cat", "/dev/shm/before-restart"}, "shared\n"},
	} {
		out, stderr, code := d.execSync(t, c, tc.cmd...)
		if code != 0 || out != tc.want {
			t.Errorf("%s: new container after restart: %v = %q %q (exit %d), want %q", handler, tc.cmd, out, stderr, code, tc.want)
		}
	}
	d.stopRemove(t, c, 2)
}

func hasExecStreams(keys []string) bool {
	for _, k := range keys {
		if strings.Contains(k, "/exec/") {
			return true
		}
	}
	return false
}

func countLines(t *testing.T, d *Daemon, id string) int {
	t.Helper()
	return len(readLog(t, d.logPath(t, id)))
}

// TestTerminalAcrossRestart: a container with a terminal and stdin takes
// input through `crictl attach` before a daemon restart (SIGKILL) and after
// it, on kuasar-runc as on stock runc.
func TestTerminalAcrossRestart(t *testing.T) {
	for _, handler := range []string{kuasarRunc, stockRunc} {
		t.Run(handler, func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			podCfg := d.podConfig("ttyrestart")
			pod := d.runPod(t, handler, podCfg)
			cfg := ctrConfig("shell", "sh", "-c", `while read -r line; do eval "$line"; done`)
			cfg.Stdin, cfg.Tty = true, true
			c := d.run(t, pod, podCfg, cfg)
			d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_RUNNING, 10*time.Second)

			// The first session goes with the daemon.
			first := d.crictl("attach", "-it", c)
			f, err := pty.Start(first)
			if err != nil {
				t.Fatal(err)
			}
			go io.Copy(io.Discard, f)
			time.Sleep(500 * time.Millisecond)
			io.WriteString(f, "echo before-$((2+3))\n")
			d.waitLog(t, c, "before-5", 10*time.Second)
			d.restart(syscall.SIGKILL)
			first.Wait()
			f.Close()

			out := ptyRun(t, d.crictl("attach", "-it", c), "echo after-$((2+4))\nexit 4\n", 30*time.Second)
			d.waitLog(t, c, "after-6", 10*time.Second)
			if st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second); st.ExitCode != 4 {
				t.Fatalf("exit %d after the restart, want 4 (attach showed %q)", st.ExitCode, out)
			}
		})
	}
}

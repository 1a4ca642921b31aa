//go:build e2e || bench || conformance || pkg || kube

package integration

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

// podConfig is a pod as the kubelet would describe it.
func (d *Daemon) podConfig(name string) *runtimeapi.PodSandboxConfig {
	uid := name + "-" + randHex(4)
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Uid: uid, Namespace: "e2e"},
		Hostname:     name,
		LogDirectory: filepath.Join(d.Dir, "logs", uid),
		Labels:       map[string]string{"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "e2e", "io.kubernetes.pod.uid": uid},
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: d.CgroupParent + "/" + uid,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Pid: runtimeapi.NamespaceMode_CONTAINER},
			},
		},
	}
}

// ctrConfig is a busybox container running cmd.
func ctrConfig(name string, cmd ...string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: images.Busybox},
		Command:  cmd,
		LogPath:  name + ".log",
		Linux: &runtimeapi.LinuxContainerConfig{
			SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Pid: runtimeapi.NamespaceMode_CONTAINER},
			},
		},
	}
}

func (d *Daemon) pull(t *testing.T, image string) {
	t.Helper()
	if _, err := d.IS.PullImage(ctx(t), &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: image}}); err != nil {
		t.Fatalf("pull %s: %v", image, err)
	}
}

func (d *Daemon) runPod(t *testing.T, handler string, cfg *runtimeapi.PodSandboxConfig) string {
	t.Helper()
	r, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		t.Fatalf("RunPodSandbox(%s): %v", handler, err)
	}
	return r.PodSandboxId
}

func (d *Daemon) create(t *testing.T, pod string, podCfg *runtimeapi.PodSandboxConfig, cfg *runtimeapi.ContainerConfig) string {
	t.Helper()
	r, err := d.RS.CreateContainer(ctx(t), &runtimeapi.CreateContainerRequest{PodSandboxId: pod, Config: cfg, SandboxConfig: podCfg})
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	return r.ContainerId
}

func (d *Daemon) start1(t *testing.T, id string) {
	t.Helper()
	if _, err := d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
}

// run creates and starts a container.
func (d *Daemon) run(t *testing.T, pod string, podCfg *runtimeapi.PodSandboxConfig, cfg *runtimeapi.ContainerConfig) string {
	t.Helper()
	id := d.create(t, pod, podCfg, cfg)
	d.start1(t, id)
	return id
}

func (d *Daemon) status(t *testing.T, id string) *runtimeapi.ContainerStatus {
	t.Helper()
	r, err := d.RS.ContainerStatus(ctx(t), &runtimeapi.ContainerStatusRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("ContainerStatus: %v", err)
	}
	return r.Status
}

func (d *Daemon) podState(t *testing.T, id string) runtimeapi.PodSandboxState {
	t.Helper()
	r, err := d.RS.PodSandboxStatus(ctx(t), &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id})
	if err != nil {
		t.Fatalf("PodSandboxStatus: %v", err)
	}
	return r.Status.State
}

// waitState waits for a container to reach state.
func (d *Daemon) waitState(t *testing.T, id string, state runtimeapi.ContainerState, timeout time.Duration) *runtimeapi.ContainerStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := d.status(t, id)
		if st.State == state {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s is %v after %v, want %v", id[:12], st.State, timeout, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *Daemon) stopRemove(t *testing.T, id string, grace int64) {
	t.Helper()
	if _, err := d.RS.StopContainer(ctx(t), &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: grace}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if _, err := d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
}

func (d *Daemon) removePod(t *testing.T, id string) {
	t.Helper()
	if _, err := d.RS.StopPodSandbox(ctx(t), &runtimeapi.StopPodSandboxRequest{PodSandboxId: id}); err != nil {
		t.Fatalf("StopPodSandbox: %v", err)
	}
	if _, err := d.RS.RemovePodSandbox(ctx(t), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id}); err != nil {
		t.Fatalf("RemovePodSandbox: %v", err)
	}
}

func (d *Daemon) execSync(t *testing.T, id string, cmd ...string) (string, string, int32) {
	t.Helper()
	r, err := d.RS.ExecSync(ctx(t), &runtimeapi.ExecSyncRequest{ContainerId: id, Cmd: cmd, Timeout: 30})
	if err != nil {
		t.Fatalf("ExecSync %v: %v", cmd, err)
	}
	return string(r.Stdout), string(r.Stderr), r.ExitCode
}

// logLine is one line of a CRI container log.
type logLine struct {
	Stream string
	Text   string
}

// readLog parses a CRI log file ("<time> <stream> <P|F> <text>").
func readLog(t *testing.T, path string) []logLine {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("reading log: %v", err)
	}
	defer f.Close()
	var out []logLine
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) != 4 {
			t.Fatalf("malformed CRI log line %q", sc.Text())
		}
		if _, err := time.Parse(time.RFC3339Nano, parts[0]); err != nil {
			t.Fatalf("log line without timestamp: %q", sc.Text())
		}
		out = append(out, logLine{Stream: parts[1], Text: parts[3]})
	}
	return out
}

func (d *Daemon) logPath(t *testing.T, id string) string {
	return d.status(t, id).LogPath
}

// waitLog waits until the container's log has a line containing s.
func (d *Daemon) waitLog(t *testing.T, id, s string, timeout time.Duration) {
	t.Helper()
	path := d.logPath(t, id)
	deadline := time.Now().Add(timeout)
	for {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), s) {
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(path)
			t.Fatalf("log of %s has no %q after %v:\n%s", id[:12], s, timeout, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// crictl runs crictl against the daemon.
func (d *Daemon) crictl(args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(binDir, "crictl"),
		append([]string{"--runtime-endpoint", "unix://" + d.Addr, "--image-endpoint", "unix://" + d.Addr, "--timeout", "60s"}, args...)...)
	cmd.Env = append(os.Environ(), "CRI_CONFIG_FILE=/dev/null")
	return cmd
}

func (d *Daemon) crictlOut(t *testing.T, args ...string) string {
	t.Helper()
	out, err := d.crictl(args...).CombinedOutput()
	if err != nil {
		t.Fatalf("crictl %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func must(t *testing.T, err error, what string, args ...any) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", fmt.Sprintf(what, args...), err)
	}
}

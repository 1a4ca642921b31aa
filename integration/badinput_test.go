//go:build e2e

package integration

import (
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestBadInput: each bad request fails with a clear CRI error, and leaves
// nothing behind (the daemon's cleanup checks mounts, netns, cgroups,
// processes, sockets and state files).
func TestBadInput(t *testing.T) {
	d := startDaemon(t, daemonOptions{})

	t.Run("unknown handler", func(t *testing.T) {
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("nohandler"), RuntimeHandler: "no-such-handler"})
		expectErr(t, err, "no-such-handler")
	})
	t.Run("non-namespaced sysctl", func(t *testing.T) {
		cfg := d.podConfig("badsysctl")
		cfg.Linux.Sysctls = map[string]string{"kernel.pid_max": "4096"}
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: kuasarRunc})
		expectErr(t, err, "kernel.pid_max")
	})
	t.Run("net sysctl with host network", func(t *testing.T) {
		cfg := d.podConfig("hostnetsysctl")
		cfg.Linux.SecurityContext.NamespaceOptions.Network = runtimeapi.NamespaceMode_NODE
		cfg.Linux.Sysctls = map[string]string{"net.ipv4.ip_forward": "1"}
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: kuasarRunc})
		expectErr(t, err, "net.ipv4.ip_forward")
	})

	podCfg := d.podConfig("bad")
	pod := d.runPod(t, kuasarRunc, podCfg)
	t.Run("missing image", func(t *testing.T) {
		cfg := ctrConfig("noimage", "true")
		cfg.Image.Image = "docker.io/library/does-not-exist:1"
		_, err := d.RS.CreateContainer(ctx(t), &runtimeapi.CreateContainerRequest{PodSandboxId: pod, Config: cfg, SandboxConfig: podCfg})
		expectErr(t, err, "does-not-exist")
	})
	t.Run("missing command", func(t *testing.T) {
		id := d.create(t, pod, podCfg, ctrConfig("nocmd", "/no/such/command"))
		_, err := d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: id})
		expectErr(t, err, "/no/such/command")
		if _, err := d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Fatalf("removing the failed container: %v", err)
		}
	})
	t.Run("unknown user", func(t *testing.T) {
		cfg := ctrConfig("nouser", "true")
		cfg.Linux.SecurityContext.RunAsUsername = "no-such-user"
		_, err := d.RS.CreateContainer(ctx(t), &runtimeapi.CreateContainerRequest{PodSandboxId: pod, Config: cfg, SandboxConfig: podCfg})
		// CRI's own message (stock says the same).
		expectErr(t, err, "no users found")
	})
	t.Run("mount escaping the rootfs", func(t *testing.T) {
		const escape = "/tmp/kuasar-escape"
		os.RemoveAll(escape)
		cfg := ctrConfig("escape", "true")
		cfg.Mounts = []*runtimeapi.Mount{{HostPath: d.Dir, ContainerPath: "/../../../.." + escape, Readonly: true}}
		id := d.create(t, pod, podCfg, cfg)
		_, _ = d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: id})
		if _, err := os.Stat(escape); err == nil {
			os.RemoveAll(escape)
			t.Fatal("a container mount escaped its rootfs onto the host")
		}
		if _, err := d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Fatalf("removing: %v", err)
		}
	})
	t.Run("exec in a missing container", func(t *testing.T) {
		_, err := d.RS.ExecSync(ctx(t), &runtimeapi.ExecSyncRequest{ContainerId: "nope", Cmd: []string{"true"}})
		expectCode(t, err, codes.NotFound)
	})
	d.removePod(t, pod)

	// A pod whose containers still run when it is stopped.
	cfg := d.podConfig("busy")
	busy := d.runPod(t, kuasarRunc, cfg)
	d.run(t, busy, cfg, ctrConfig("s1", "sleep", "3600"))
	d.run(t, busy, cfg, ctrConfig("s2", "sh", "-c", "trap '' TERM; sleep 3600"))
	d.removePod(t, busy)
}

// TestMissingRuntime: with runc absent, kuasar-runc pods fail with an error
// that says what is missing and where to configure it.
func TestMissingRuntime(t *testing.T) {
	d := startDaemon(t, daemonOptions{extraConfig: "[plugins.'io.containerd.sandbox.controller.v1.kuasar-runc']\n  runtime = \"/nonexistent/runc\"\n"})
	_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("noruntime"), RuntimeHandler: kuasarRunc})
	expectErr(t, err, "/nonexistent/runc")
	expectErr(t, err, "kuasar-runc")
}

func expectErr(t *testing.T, err error, mention string) {
	t.Helper()
	if err == nil {
		t.Fatalf("expected an error mentioning %q", mention)
	}
	if !strings.Contains(err.Error(), mention) {
		t.Fatalf("error does not mention %q: %v", mention, err)
	}
	t.Logf("error as expected: %v", err)
}

func expectCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("error %v, want code %v", err, code)
	}
}

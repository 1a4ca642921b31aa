package images

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Registry is a local image registry (Debian's docker-registry).
type Registry struct {
	Addr string
	cmd  *exec.Cmd
}

const registryBinary = "/usr/bin/docker-registry"

// StartRegistry serves a registry on addr with its storage in dir, or
// reuses one already answering there.
func StartRegistry(ctx context.Context, addr, dir string) (*Registry, error) {
	if registryUp(addr) {
		return &Registry{Addr: addr}, nil
	}
	if _, err := os.Stat(registryBinary); err != nil {
		return nil, fmt.Errorf("%s missing (install docker-registry): %w", registryBinary, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, "config.yml")
	content := fmt.Sprintf("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr)
	if err := os.WriteFile(cfg, []byte(content), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(registryBinary, "serve", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	r := &Registry{Addr: addr, cmd: cmd}
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if registryUp(addr) {
			return r, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	r.Stop()
	return nil, fmt.Errorf("registry did not come up on %s; see %s", addr, logf.Name())
}

func registryUp(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	resp, err := http.Get("http://" + addr + "/v2/")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized
}

// Stop ends a registry this process started.
func (r *Registry) Stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { r.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = r.cmd.Process.Kill()
		<-done
	}
}

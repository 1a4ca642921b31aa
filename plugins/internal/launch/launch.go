// Package launch starts the node-wide helper processes of containerd-kuasar
// (the process keeper, the Wasm host) on demand: detached in a session of
// their own, so that they outlive the daemon that started them.
package launch

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Spec describes a helper to start.
type Spec struct {
	Binary  string   // executable
	Args    []string // arguments
	LogPath string   // file its output goes to
	// Timeout bounds the wait for Ready (default 10s).
	Timeout time.Duration
}

// Detached starts s and waits until ready succeeds (it is retried), the
// helper exits, or ctx is done.
func Detached(ctx context.Context, s Spec, ready func(context.Context) error) error {
	if _, err := os.Stat(s.Binary); err != nil {
		return fmt.Errorf("%s: %w", filepath.Base(s.Binary), err)
	}
	if err := os.MkdirAll(filepath.Dir(s.LogPath), 0o700); err != nil {
		return err
	}
	logf, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("log of %s: %w", filepath.Base(s.Binary), err)
	}
	defer logf.Close()
	cmd := exec.Command(s.Binary, s.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", s.Binary, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reap it if it ends while we live

	timeout := s.Timeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	var lastErr error
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); {
		select {
		case err := <-exited:
			return fmt.Errorf("%s exited at start (%v); see %s", filepath.Base(s.Binary), err, s.LogPath)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if lastErr = ready(ctx); lastErr == nil {
			return nil
		}
	}
	return fmt.Errorf("%s did not become ready: %w", filepath.Base(s.Binary), lastErr)
}

// Find resolves a helper binary: the configured path, else one named name
// beside the running executable, else one on PATH.
func Find(configured, name string) (string, error) {
	if configured != "" {
		if _, err := os.Stat(configured); err != nil {
			return "", fmt.Errorf("%s binary %q: %w", name, configured, err)
		}
		return configured, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s not found beside the daemon or on PATH: %w", name, err)
	}
	return p, nil
}

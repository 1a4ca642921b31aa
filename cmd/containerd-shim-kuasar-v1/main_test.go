package main

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go/features"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	apitypes "github.com/containerd/containerd/api/types"
	"google.golang.org/protobuf/proto"
)

func TestRun(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantCode int
		check    func(t *testing.T, out, errOut []byte)
	}{
		{"delete", []string{"-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/bin/x", "-id", "abc", "-bundle", "/b", "delete"}, 0,
			func(t *testing.T, out, _ []byte) {
				var r taskAPI.DeleteResponse
				if err := proto.Unmarshal(out, &r); err != nil || r.ExitStatus != unknownStatus || r.ExitedAt == nil {
					t.Fatalf("bad delete response %v %v", &r, err)
				}
			}},
		{"info", []string{"-info"}, 0, func(t *testing.T, out, _ []byte) {
			var ri apitypes.RuntimeInfo
			if err := proto.Unmarshal(out, &ri); err != nil || ri.Name != RuntimeName {
				t.Fatalf("bad runtime info %v %v", &ri, err)
			}
			if _, err := exec.LookPath("runc"); err != nil {
				t.Log("runc not installed: features not checked")
				return
			}
			v, err := typeurl.UnmarshalAny(ri.Features)
			if err != nil {
				t.Fatalf("features do not decode as containerd decodes them: %v", err)
			}
			if f, ok := v.(*features.Features); !ok || len(f.MountOptions) == 0 {
				t.Fatalf("features %T %+v", v, v)
			}
		}},
		{"start refused", []string{"-namespace", "k8s.io", "-id", "x", "start"}, 1, func(t *testing.T, _, errOut []byte) {
			if !strings.Contains(string(errOut), "not a shim") {
				t.Fatalf("unclear refusal: %s", errOut)
			}
		}},
		{"version", []string{"-v"}, 0, func(t *testing.T, out, _ []byte) {
			if !strings.Contains(string(out), "containerd-kuasar") {
				t.Fatalf("version output %q", out)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := run(tt.args, strings.NewReader(""), &out, &errOut); code != tt.wantCode {
				t.Fatalf("exit %d, want %d (stderr %s)", code, tt.wantCode, errOut.String())
			}
			tt.check(t, out.Bytes(), errOut.Bytes())
		})
	}
}

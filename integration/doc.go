// Package integration holds containerd-kuasar's end-to-end tests: each
// starts a real containerd-kuasar (or stock containerd) in a temporary root
// and drives it through the CRI API and crictl, with images built locally
// and served from a local registry. They need root and are built with the
// e2e tag: `make e2e` (or `make test`) sets them up.
package integration

// Usersclient drives the service through a client that oapi-codegen
// generates from the served /openapi.json (see .ci/run): it creates, reads,
// lists page by page following Link, updates, looks up by email and deletes
// a user, and checks a 400 and a 404. It exits non-zero at the first answer
// that is not the one the description promises.
//
// Usage: usersclient http://127.0.0.1:8000
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: usersclient BASE_URL")
		os.Exit(2)
	}
	if err := drive(context.Background(), os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "usersclient:", err)
		os.Exit(1)
	}
	fmt.Println("usersclient: every call answered as described")
}

func drive(ctx context.Context, base string) error {
	c, err := NewClientWithResponses(base)
	if err != nil {
		return err
	}

	health, err := c.HealthWithResponse(ctx)
	if err != nil || health.JSON200 == nil || health.JSON200.Status != HealthStatusOK {
		return fmt.Errorf("GET /healthz: %v %s", err, answer(health))
	}

	// Three users, so that pages of two need a Link to reach them all.
	tag := strconv.Itoa(os.Getpid())
	var ids []int64
	for i := range 3 {
		created, err := c.CreateUserWithResponse(ctx, CreateUserJSONRequestBody{
			FirstName: "Gen", LastName: "Client" + strconv.Itoa(i),
			Email:    Email(fmt.Sprintf("Gen.%s.%d@Example.com", tag, i)),
			Password: "correct horse battery",
		})
		if err != nil || created.JSON201 == nil || created.Headers201 == nil {
			return fmt.Errorf("POST /users/: %v %s", err, answer(created))
		}
		if want := fmt.Sprintf("/users/%d", created.JSON201.Id); created.Headers201.Location != want {
			return fmt.Errorf("POST /users/: Location %q, want %q", created.Headers201.Location, want)
		}
		ids = append(ids, created.JSON201.Id)
	}
	email := Email(fmt.Sprintf("gen.%s.0@example.com", tag))

	got, err := c.GetUserWithResponse(ctx, ids[0], nil)
	if err != nil || got.JSON200 == nil || got.JSON200.Email != email || got.Headers200 == nil {
		return fmt.Errorf("GET /users/%d: %v %s", ids[0], err, answer(got))
	}

	// Every page, following Link until a page comes without one.
	var listed []int64
	limit := 2
	params := &ListUsersParams{Limit: &limit}
	for pages := 0; ; pages++ {
		page, err := c.ListUsersWithResponse(ctx, params)
		if err != nil || page.JSON200 == nil || page.Headers200 == nil || pages > 1000 {
			return fmt.Errorf("GET /users/ page %d: %v %s", pages, err, answer(page))
		}
		for _, u := range *page.JSON200 {
			listed = append(listed, u.Id)
		}
		if page.Headers200.Link == nil {
			break
		}
		if params, err = nextPage(*page.Headers200.Link); err != nil {
			return err
		}
		if *params.AfterId != listed[len(listed)-1] {
			return fmt.Errorf("the Link header %q: after_id is not the last id of the page, %d", *page.Headers200.Link, listed[len(listed)-1])
		}
	}
	if !slices.IsSorted(listed) || len(slices.Compact(slices.Clone(listed))) != len(listed) {
		return fmt.Errorf("GET /users/ following Link: ids %v, want each once, in order", listed)
	}
	for _, id := range ids {
		if !slices.Contains(listed, id) {
			return fmt.Errorf("GET /users/ following Link: ids %v, want %d among them", listed, id)
		}
	}

	last := "Smith"
	// Conditional on the ETag read; sent again, that tag is stale.
	ifMatch := &UpdateUserParams{IfMatch: &got.Headers200.ETag}
	updated, err := c.UpdateUserWithResponse(ctx, ids[0], ifMatch, UpdateUserJSONRequestBody{LastName: &last})
	if err != nil || updated.JSON200 == nil || updated.JSON200.LastName != last || updated.JSON200.FirstName != "Gen" {
		return fmt.Errorf("PUT /users/%d: %v %s", ids[0], err, answer(updated))
	}
	stale, err := c.UpdateUserWithResponse(ctx, ids[0], ifMatch, UpdateUserJSONRequestBody{FirstName: &last})
	if err != nil || stale.JSON412 == nil {
		return fmt.Errorf("PUT /users/%d with a stale If-Match: %v %s", ids[0], err, answer(stale))
	}

	found, err := c.ListUsersWithResponse(ctx, &ListUsersParams{Email: &email})
	if err != nil || found.JSON200 == nil || len(*found.JSON200) != 1 || (*found.JSON200)[0].Id != ids[0] {
		return fmt.Errorf("GET /users/?email=%s: %v %s", email, err, answer(found))
	}

	for _, id := range ids {
		deleted, err := c.DeleteUserWithResponse(ctx, id, nil)
		if err != nil || deleted.StatusCode() != 204 {
			return fmt.Errorf("DELETE /users/%d: %v %s", id, err, answer(deleted))
		}
	}

	bad, err := c.CreateUserWithResponse(ctx, CreateUserJSONRequestBody{
		FirstName: "Gen", LastName: "Client", Email: email, Password: "short",
	})
	if err != nil || bad.JSON400 == nil || bad.JSON400.Detail != "Invalid data" || bad.JSON400.Errors == nil || (*bad.JSON400.Errors)["password"] == "" {
		return fmt.Errorf("POST /users/ with a short password: %v %s", err, answer(bad))
	}

	gone, err := c.GetUserWithResponse(ctx, ids[0], nil)
	if err != nil || gone.JSON404 == nil || gone.JSON404.Detail != "User not found" {
		return fmt.Errorf("GET /users/%d after DELETE: %v %s", ids[0], err, answer(gone))
	}
	var _ *ErrorResponse = gone.JSON404 // the error body's type has its own name
	return nil
}

// nextPage returns the query of a Link header's rel="next" address.
func nextPage(link string) (*ListUsersParams, error) {
	target, rest, ok := strings.Cut(strings.TrimPrefix(link, "<"), ">")
	if !ok || !strings.Contains(rest, `rel="next"`) {
		return nil, fmt.Errorf("the Link header %q: not one rel=\"next\" address", link)
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("the Link header %q: %v", link, err)
	}
	limit, err1 := strconv.Atoi(u.Query().Get("limit"))
	afterID, err2 := strconv.ParseInt(u.Query().Get("after_id"), 10, 64)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("the Link header %q: no limit and after_id", link)
	}
	return &ListUsersParams{Limit: &limit, AfterId: &afterID}, nil
}

// answer describes a response for an error message: status and body.
func answer[R interface {
	StatusCode() int
	GetBody() []byte
}](r *R) string {
	if r == nil {
		return "(no answer)"
	}
	return fmt.Sprintf("%d %.300s", (*r).StatusCode(), (*r).GetBody())
}

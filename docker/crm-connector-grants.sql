-- What the CRM connector (src/retention/systems/crm) needs in the CRM database, and nothing more.
-- Run by the CRM's owner (or an administrator) once the tables exist, with psql:
--
--   psql -v ON_ERROR_STOP=1 -v connector=retention_crm -d crm -f docker/crm-connector-grants.sql
--
-- The demo runs it in the crm-demo-grants service; tests/test_docker_compose.py runs it on a real
-- PostgreSQL and then extracts, erases and minimises as that role, and checks what the role cannot
-- do. The names are those of the reference schema (retention.systems.crm.schema); a CRM described
-- by include/crm_mapping.yaml grants the same on its own tables and columns.
--
-- What the connector does:
--   reads    every mapped table (the extract, the erasure request's look-up, the holds);
--   deletes  a contact with its notes, event participations, course registrations and survey
--            responses; an event participation, course registration, survey response or invoice
--            on its own (never an organisation, a membership or a manual hold);
--   updates  invoice.contact_id to NULL when it minimises a contact (the invoice stays);
--   locks    the rows it is about to erase (SELECT ... FOR UPDATE), which PostgreSQL allows only
--            with UPDATE on at least one column of the table: UPDATE on the key column `id` of
--            each table it erases from is the narrowest grant that allows it (an id referenced by
--            another row cannot change: the foreign keys refuse it).
-- It never inserts, never creates, alters, drops or truncates anything, and needs no sequence.

GRANT USAGE ON SCHEMA public TO :"connector";

GRANT SELECT ON organisation, membership, contact, communication_note, event_participation,
    course_registration, survey_response, invoice, legal_hold TO :"connector";

GRANT DELETE ON contact, communication_note, event_participation, course_registration,
    survey_response, invoice TO :"connector";

GRANT UPDATE (contact_id) ON invoice TO :"connector";

GRANT UPDATE (id) ON contact, event_participation, course_registration, survey_response TO :"connector";
